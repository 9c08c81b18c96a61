//! The messenger: an encrypted profile plus a server connection.
//!
//! [`Messenger`] is what applications use: it registers identities, creates
//! groups, invites members (fetching their key packages), sends messages,
//! and turns everything arriving in the queue into [`Event`]s.  Commits go
//! through the server's one-commit-per-epoch ordering: a commit that loses
//! (`staleEpoch`) is discarded, the winner is processed, and the operation
//! is retried.  Lost connections are re-established with exponential
//! backoff; enqueues are idempotent (message ids), so a retry never
//! duplicates a message.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quicnprotochat_core::PeerInfo;
use quicnprotochat_core::framing::{self, FrameKind};
use quicnprotochat_core::{
    CommitOutcome, Delivered, Event, GroupError, GroupSummary, Identity, IdentityKey, MemberInfo,
    Outgoing, Profile, ProfileKey, StateError, StoredMessage,
};
use quicnprotochat_p2p::{Inbound, Node, NodeConfig, PeerAddr};
use quicnprotochat_proto::transport::ServerAuth;
use tokio::sync::{Mutex, RwLock, broadcast, mpsc};

use crate::connection::Client;
use crate::error::{ClientError, ServerErrorCode};
use crate::types::{ClientConfig, Envelope};

/// One-time key packages published at registration and on replenishment.
pub const KEY_PACKAGE_BATCH: usize = 20;

/// Replenish when fewer one-time packages than this remain on the server.
pub const KEY_PACKAGE_LOW_WATER: u32 = 5;

/// Key-package lifetime: 28 days (RFC 9420 leaves it to the application;
/// openmls defaults to 12 weeks, we rotate sooner).
pub const KEY_PACKAGE_LIFETIME: Duration = Duration::from_secs(28 * 24 * 3600);

/// Attempts of a commit that keeps losing the epoch race before giving up.
pub const MAX_COMMIT_ATTEMPTS: usize = 8;

/// Reconnect backoff: first delay and cap.
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Messages fetched per `fetch` call while syncing.
const SYNC_BATCH: u32 = 256;

/// Errors of messenger operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MessengerError {
    /// talking to the server failed
    #[error(transparent)]
    Client(#[from] ClientError),
    /// a group operation failed
    #[error(transparent)]
    Group(#[from] GroupError),
    /// the profile failed
    #[error(transparent)]
    State(#[from] StateError),
    /// no such user on the server
    #[error("no user named {0:?} on the server")]
    NoSuchUser(String),
    /// the direct path failed to start
    #[error(transparent)]
    P2p(#[from] quicnprotochat_p2p::P2pError),
    /// the user has no key package left to be invited with
    #[error("{0} has no key package available; they need to come online")]
    NoKeyPackage(String),
    /// the profile lacks server settings
    #[error("the profile has no server configured: {0}")]
    NotConfigured(&'static str),
    /// a commit lost the epoch race too often
    #[error("the group kept changing under us; try again")]
    CommitConflict,
}

impl From<quicnprotochat_core::KeyPackageError> for MessengerError {
    fn from(e: quicnprotochat_core::KeyPackageError) -> Self {
        Self::Group(GroupError::KeyPackage(e))
    }
}

/// Events buffered per listener before the slowest one starts to miss
/// some (history is stored regardless).
const EVENT_BUS: usize = 4096;

/// The stream of events from [`Messenger::listen`]: everything processed,
/// whether it arrived through the server or directly from a peer.
#[derive(Debug)]
pub struct EventStream {
    rx: broadcast::Receiver<Event>,
    task: tokio::task::JoinHandle<()>,
}

impl EventStream {
    /// The next event; `None` if the messenger stopped.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            match self.rx.recv().await {
                Ok(e) => return Some(e),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "event listener fell behind; see history for missed messages"
                    );
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Peer-to-peer delivery settings.
#[derive(Debug, Clone)]
pub struct P2pOptions {
    /// local UDP address of the iroh endpoint
    pub bind: std::net::SocketAddr,
    /// relay URL for peers behind NAT (none: direct addresses only)
    pub relay_url: Option<String>,
    /// announce our address in our groups (opt out to receive only)
    pub announce: bool,
    /// also send through the server when direct delivery succeeded
    /// (belt and braces; recipients show each message once)
    pub redundant: bool,
}

impl Default for P2pOptions {
    fn default() -> Self {
        Self {
            bind: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            relay_url: None,
            announce: true,
            redundant: false,
        }
    }
}

struct P2p {
    node: Node,
    options: P2pOptions,
    inbound: tokio::task::JoinHandle<()>,
}

/// A profile connected to its server.
#[derive(Clone)]
pub struct Messenger {
    inner: Arc<Inner>,
}

struct Inner {
    profile: Mutex<Profile>,
    identity: Identity,
    client: RwLock<Client>,
    server: ClientConfig,
    dir: PathBuf,
    events: broadcast::Sender<Event>,
    p2p: RwLock<Option<P2p>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(p2p) = self.p2p.get_mut().take() {
            p2p.inbound.abort();
            let node = p2p.node;
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { node.close().await });
            }
        }
    }
}

impl std::fmt::Debug for Messenger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messenger")
            .field("profile", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

const SET_ADDR: &str = "server_addr";
const SET_NAME: &str = "server_name";
const SET_PIN: &str = "server_pin";
const SET_TOKEN: &str = "access_token";
/// The iroh endpoint's secret key: a stable endpoint id across restarts.
const P2P_SECRET: &str = "p2p_secret";

fn to_peer_addr(p: &PeerInfo) -> PeerAddr {
    PeerAddr {
        id: p.endpoint_id,
        addrs: p.addrs.clone(),
        relay_url: p.relay_url.clone(),
    }
}

fn from_peer_addr(p: &PeerAddr) -> PeerInfo {
    PeerInfo {
        endpoint_id: p.id,
        addrs: p.addrs.clone(),
        relay_url: p.relay_url.clone(),
    }
}

fn save_server(profile: &Profile, server: &ClientConfig) -> Result<(), MessengerError> {
    profile.set_setting(SET_ADDR, server.server_addr.to_string().as_bytes())?;
    profile.set_setting(SET_NAME, server.server_name.as_bytes())?;
    match &server.server_auth {
        ServerAuth::Pinned(fp) => profile.set_setting(SET_PIN, fp)?,
        ServerAuth::Roots(_) => profile.set_setting(SET_PIN, b"")?,
    }
    profile.set_setting(SET_TOKEN, &server.access_token)?;
    Ok(())
}

fn load_server(profile: &Profile) -> Result<ClientConfig, MessengerError> {
    let text = |k: &'static str| -> Result<String, MessengerError> {
        let v = profile
            .setting(k)?
            .ok_or(MessengerError::NotConfigured(k))?;
        String::from_utf8(v).map_err(|_| MessengerError::NotConfigured(k))
    };
    let addr = text(SET_ADDR)?
        .parse()
        .map_err(|_| MessengerError::NotConfigured(SET_ADDR))?;
    let pin: [u8; 32] = profile
        .setting(SET_PIN)?
        .and_then(|v| v.try_into().ok())
        .ok_or(MessengerError::NotConfigured(
            "server certificate pin (profiles using CA roots must pass them on open)",
        ))?;
    let token = profile
        .setting(SET_TOKEN)?
        .ok_or(MessengerError::NotConfigured(SET_TOKEN))?;
    let mut cfg = ClientConfig::new(addr, ServerAuth::Pinned(pin), token);
    cfg.server_name = text(SET_NAME)?;
    Ok(cfg)
}

async fn connect(server: &ClientConfig, identity: &Identity) -> Result<Client, ClientError> {
    let client = Client::connect(server.clone()).await?;
    client.init_auth(identity).await?;
    Ok(client)
}

fn is_connection_error(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Disconnected | ClientError::Rpc(_) | ClientError::Connect { .. }
    )
}

impl Messenger {
    /// Creates a profile in `dir` for `username`, registers it with the
    /// server and publishes key packages.
    pub async fn register(
        dir: &Path,
        key: &ProfileKey,
        server: ClientConfig,
        username: &str,
    ) -> Result<Self, MessengerError> {
        let dir_buf = dir.to_path_buf();
        let (key, name) = (key.clone(), username.to_string());
        let profile = blocking(move || Profile::create(&dir_buf, &key, &name)).await?;
        save_server(&profile, &server)?;
        let client = connect(&server, profile.identity()).await?;
        client.register(username).await?;
        let m = Self::assemble(profile, client, server, dir);
        m.replenish_key_packages(true).await?;
        Ok(m)
    }

    /// Opens the profile in `dir` and connects to its server (or to
    /// `server`, which is then saved).
    pub async fn open(
        dir: &Path,
        key: &ProfileKey,
        server: Option<ClientConfig>,
    ) -> Result<Self, MessengerError> {
        let dir_buf = dir.to_path_buf();
        let key = key.clone();
        let profile = blocking(move || Profile::open(&dir_buf, &key)).await?;
        let server = match server {
            Some(s) => {
                save_server(&profile, &s)?;
                s
            }
            None => load_server(&profile)?,
        };
        let client = connect(&server, profile.identity()).await?;
        Ok(Self::assemble(profile, client, server, dir))
    }

    fn assemble(profile: Profile, client: Client, server: ClientConfig, dir: &Path) -> Self {
        Self {
            inner: Arc::new(Inner {
                identity: profile.identity().clone(),
                profile: Mutex::new(profile),
                client: RwLock::new(client),
                server,
                dir: dir.to_path_buf(),
                events: broadcast::channel(EVENT_BUS).0,
                p2p: RwLock::new(None),
            }),
        }
    }

    /// This client's username.
    pub async fn username(&self) -> String {
        self.inner.profile.lock().await.username().to_string()
    }

    /// This client's identity key.
    pub async fn identity_key(&self) -> IdentityKey {
        self.inner.profile.lock().await.identity_key()
    }

    async fn client(&self) -> Client {
        self.inner.client.read().await.clone()
    }

    /// Replaces the connection, retrying with exponential backoff until
    /// `attempts` are used up.
    async fn reconnect(&self, identity: &Identity, attempts: usize) -> Result<(), ClientError> {
        let mut delay = BACKOFF_START;
        let mut last = ClientError::Disconnected;
        for _ in 0..attempts.max(1) {
            match connect(&self.inner.server, identity).await {
                Ok(c) => {
                    *self.inner.client.write().await = c;
                    tracing::info!("reconnected");
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(error = %e, ?delay, "reconnect failed");
                    last = e;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
            }
        }
        Err(last)
    }

    /// Sends `out` to the server (enqueue), with one reconnect-and-retry on
    /// a lost connection (safe: the message id makes the retry idempotent).
    /// Named for what it does: the schema's `Listener.deliver` receives.
    async fn send_outgoing(&self, identity: &Identity, out: &Outgoing) -> Result<(), ClientError> {
        if out.recipients.is_empty() {
            return Ok(());
        }
        let first = self
            .client()
            .await
            .enqueue(&out.recipients, out.message_id, out.payload.clone())
            .await;
        match first {
            Err(e) if is_connection_error(&e) => {
                self.reconnect(identity, 3).await?;
                self.client()
                    .await
                    .enqueue(&out.recipients, out.message_id, out.payload.clone())
                    .await?;
                Ok(())
            }
            r => r.map(|_| ()),
        }
    }

    /// Publishes key packages when fewer than the low-water mark remain
    /// (always when `force`), plus a last-resort package when none is there.
    pub async fn replenish_key_packages(&self, force: bool) -> Result<u32, MessengerError> {
        let client = self.client().await;
        let (count, has_last_resort) = client.key_package_count().await?;
        if !force && count >= KEY_PACKAGE_LOW_WATER && has_last_resort {
            return Ok(0);
        }
        let packages = {
            let mut p = self.inner.profile.lock().await;
            let n = if force || count < KEY_PACKAGE_LOW_WATER {
                KEY_PACKAGE_BATCH
            } else {
                0
            };
            p.generate_key_packages(n, !has_last_resort, KEY_PACKAGE_LIFETIME.as_secs())?
        };
        if packages.is_empty() {
            return Ok(0);
        }
        Ok(client.publish_key_packages(packages).await?)
    }

    /// Creates a group with this client as its only member.
    pub async fn create_group(&self, name: &str) -> Result<(), MessengerError> {
        self.inner.profile.lock().await.create_group(name)?;
        Ok(())
    }

    /// Runs a commit-producing operation under the server's epoch ordering:
    /// on `staleEpoch`, discards it, processes the queue (the winning
    /// commit), and tries again.  Holds the profile for the whole operation
    /// so incoming messages cannot interleave with a pending commit.
    async fn commit_with<F>(
        &self,
        profile: &mut Profile,
        mut make: F,
    ) -> Result<Vec<Event>, MessengerError>
    where
        F: FnMut(&mut Profile) -> Result<CommitOutcome, GroupError>,
    {
        let mut events = Vec::new();
        for _ in 0..MAX_COMMIT_ATTEMPTS {
            let outcome = make(profile)?;
            if let Some(commit) = &outcome.commit {
                match self.send_outgoing(profile.identity(), commit).await {
                    Ok(()) => {}
                    Err(e) => {
                        profile.abort_commit(&outcome.group_id)?;
                        if e.server_code() == Some(ServerErrorCode::StaleEpoch) {
                            events.extend(self.sync_locked(profile).await?);
                            continue;
                        }
                        return Err(e.into());
                    }
                }
            }
            // Merged from here on; the Welcome waits in the outbox until the
            // server has it (a failure now is reported, and the next sync
            // sends it again).
            profile.confirm_commit_and_queue(&outcome)?;
            if let Some(welcome) = &outcome.welcome {
                self.send_from_outbox(profile, welcome).await?;
            }
            return Ok(events);
        }
        Err(MessengerError::CommitConflict)
    }

    /// Invites `username` to `group` (creating the group if it does not
    /// exist): claims one of their key packages, commits the add, routes the
    /// commit to existing members and the Welcome to the invitee.
    pub async fn invite(&self, group: &str, username: &str) -> Result<Vec<Event>, MessengerError> {
        let client = self.client().await;
        let invitee = match client.resolve(username).await {
            Ok(k) => k,
            Err(e) if e.server_code() == Some(ServerErrorCode::NotFound) => {
                return Err(MessengerError::NoSuchUser(username.to_string()));
            }
            Err(e) => return Err(e.into()),
        };
        let (kp, _last_resort) = match client.fetch_key_package(invitee).await {
            Ok(kp) => kp,
            Err(e) if e.server_code() == Some(ServerErrorCode::NotFound) => {
                return Err(MessengerError::NoKeyPackage(username.to_string()));
            }
            Err(e) => return Err(e.into()),
        };
        // The directory (server) binds username and key; the key package's
        // credential must claim the same name, so members see who they think.
        let info = quicnprotochat_core::keypackage::inspect(&kp)?;
        if info.identity != invitee || info.username.as_deref() != Some(username) {
            return Err(GroupError::WrongInvitee.into());
        }
        let events = {
            let mut profile = self.inner.profile.lock().await;
            if !profile.has_group(group)? {
                profile.create_group(group)?;
            }
            self.commit_with(&mut profile, |p| p.add_member(group, &kp, invitee))
                .await?
        };
        // The new member does not know how to reach us directly yet.
        self.announce(group).await?;
        Ok(events)
    }

    /// Members of `group` whose credential names a user the server's
    /// directory binds to another key (or does not know).
    pub async fn verify_members(&self, group: &str) -> Result<Vec<MemberInfo>, MessengerError> {
        let members = self.members(group).await?;
        let client = self.client().await;
        let mut mismatches = Vec::new();
        for m in members.into_iter().filter(|m| !m.is_self) {
            match client.resolve(&m.username).await {
                Ok(key) if key == m.key => {}
                Ok(_) => mismatches.push(m),
                Err(e) if e.server_code() == Some(ServerErrorCode::NotFound) => mismatches.push(m),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(mismatches)
    }

    /// Our direct address, when peer-to-peer delivery is enabled.
    pub async fn p2p_addr(&self) -> Option<PeerAddr> {
        self.inner.p2p.read().await.as_ref().map(|p| p.node.addr())
    }

    /// Removes `username` from `group`.
    pub async fn remove(&self, group: &str, username: &str) -> Result<Vec<Event>, MessengerError> {
        let mut profile = self.inner.profile.lock().await;
        self.commit_with(&mut profile, |p| p.remove_member(group, username))
            .await
    }

    /// Refreshes this client's keys in `group` (post-compromise security).
    pub async fn update(&self, group: &str) -> Result<Vec<Event>, MessengerError> {
        let mut profile = self.inner.profile.lock().await;
        self.commit_with(&mut profile, |p| p.self_update(group))
            .await
    }

    /// Leaves `group`: asks the others to remove us, forgets it locally.
    pub async fn leave(&self, group: &str) -> Result<(), MessengerError> {
        let mut profile = self.inner.profile.lock().await;
        if let Some(out) = profile.leave(group)? {
            self.send_outgoing(profile.identity(), &out).await?;
        }
        Ok(())
    }

    /// Sends a text message to `group`: directly to members reachable
    /// peer-to-peer (when enabled), through the server to the rest.
    pub async fn send(&self, group: &str, text: &str) -> Result<(), MessengerError> {
        let mut profile = self.inner.profile.lock().await;
        let out = profile.send_text(group, text)?;
        let remaining = self.send_direct(&profile, &out).await;
        if !remaining.is_empty() {
            let rest = Outgoing {
                recipients: remaining,
                ..out
            };
            self.send_outgoing(profile.identity(), &rest).await?;
        }
        Ok(())
    }

    /// Tries the direct path for every recipient with a known address;
    /// returns the recipients that still need the server.
    async fn send_direct(&self, profile: &Profile, out: &Outgoing) -> Vec<IdentityKey> {
        let p2p = self.inner.p2p.read().await;
        let Some(p2p) = p2p.as_ref() else {
            return out.recipients.clone();
        };
        let mut attempts = Vec::new();
        let mut remaining = Vec::new();
        for r in &out.recipients {
            match profile.peer(*r) {
                Ok(Some(peer)) => attempts.push((*r, to_peer_addr(&peer))),
                _ => remaining.push(*r),
            }
        }
        let sends = attempts
            .iter()
            .map(|(_, addr)| p2p.node.send(addr, out.message_id, &out.payload));
        let results = futures::future::join_all(sends).await;
        for ((r, _), result) in attempts.into_iter().zip(results) {
            match result {
                Ok(()) if !p2p.options.redundant => {}
                Ok(()) => remaining.push(r),
                Err(e) => {
                    tracing::debug!(recipient = %r, error = %e, "direct delivery failed; using the server");
                    remaining.push(r);
                }
            }
        }
        remaining
    }

    /// Starts peer-to-peer delivery: binds the iroh endpoint with the
    /// profile's stable key, accepts direct messages from members of our
    /// groups, and (unless opted out) announces our address in every group.
    /// Returns our endpoint id.
    pub async fn enable_p2p(&self, options: P2pOptions) -> Result<[u8; 32], MessengerError> {
        let (secret, allowed, groups) = {
            let profile = self.inner.profile.lock().await;
            let secret: [u8; 32] =
                match profile.setting(P2P_SECRET)?.and_then(|v| v.try_into().ok()) {
                    Some(s) => s,
                    None => {
                        let mut s = [0u8; 32];
                        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s)
                            .map_err(|_| MessengerError::NotConfigured("system RNG failed"))?;
                        profile.set_setting(P2P_SECRET, &s)?;
                        s
                    }
                };
            let groups: Vec<String> = profile.groups()?.into_iter().map(|g| g.name).collect();
            (secret, profile.allowed_endpoint_ids()?, groups)
        };
        let config = NodeConfig {
            bind: options.bind,
            relay_url: options.relay_url.clone(),
            ..NodeConfig::default()
        };
        let (node, rx) = Node::bind(secret, config).await?;
        for id in allowed {
            node.allow(id);
        }
        let id = node.id();
        let inbound = tokio::spawn(self.clone().inbound_loop(rx));
        let announce = options.announce;
        if let Some(old) = self.inner.p2p.write().await.replace(P2p {
            node,
            options,
            inbound,
        }) {
            old.inbound.abort();
            old.node.close().await;
        }
        if announce {
            for g in groups {
                self.announce(&g).await?;
            }
        }
        Ok(id)
    }

    /// Stops peer-to-peer delivery (later messages go through the server).
    pub async fn disable_p2p(&self) {
        if let Some(p2p) = self.inner.p2p.write().await.take() {
            p2p.inbound.abort();
            p2p.node.close().await;
        }
    }

    /// Announces our direct address to the members of `group` (through the
    /// server: they may not know us yet).
    async fn announce(&self, group: &str) -> Result<(), MessengerError> {
        let peer = {
            let p2p = self.inner.p2p.read().await;
            match p2p.as_ref() {
                Some(p) if p.options.announce => from_peer_addr(&p.node.addr()),
                _ => return Ok(()),
            }
        };
        let mut profile = self.inner.profile.lock().await;
        if let Some(out) = profile.announce_peer(group, &peer)? {
            self.send_outgoing(profile.identity(), &out).await?;
        }
        Ok(())
    }

    async fn inbound_loop(self, mut rx: mpsc::Receiver<Inbound>) {
        while let Some(m) = rx.recv().await {
            // Only application messages may bypass the server: commits need
            // its one-per-epoch ordering.
            if framing::inspect(&m.payload).kind != FrameKind::Application {
                tracing::warn!("refused a direct message that is not an application message");
                m.reject();
                continue;
            }
            let result = self
                .inner
                .profile
                .lock()
                .await
                .process(&m.message_id, &m.payload);
            match result {
                Ok(events) => {
                    m.accept();
                    self.publish(&events).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "refused an invalid direct message");
                    m.reject();
                }
            }
        }
    }

    /// Hands events to listeners and reacts to them: allow announced peers,
    /// announce ourselves where members joined.
    async fn publish(&self, events: &[Event]) {
        let mut announce_in = Vec::new();
        {
            let p2p = self.inner.p2p.read().await;
            for e in events {
                match e {
                    Event::PeerAnnounced { endpoint_id, .. } => {
                        if let Some(p) = p2p.as_ref() {
                            p.node.allow(*endpoint_id);
                        }
                    }
                    Event::Joined { group, .. } | Event::MembersAdded { group, .. } => {
                        announce_in.push(group.clone())
                    }
                    _ => {}
                }
                let _ = self.inner.events.send(e.clone());
            }
        }
        for g in announce_in {
            if let Err(e) = self.announce(&g).await {
                tracing::debug!(error = %e, "announcing our direct address failed");
            }
            match self.verify_members(&g).await {
                Ok(mismatches) => {
                    for m in mismatches {
                        tracing::warn!(group = %g, member = %m.username, "member's credential does not match the directory");
                        let _ = self.inner.events.send(Event::DirectoryMismatch {
                            group: g.clone(),
                            member: m.username,
                            key: m.key,
                        });
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "checking members against the directory failed")
                }
            }
        }
    }

    /// Local groups.
    pub async fn groups(&self) -> Result<Vec<GroupSummary>, MessengerError> {
        Ok(self.inner.profile.lock().await.groups()?)
    }

    /// Members of a group.
    pub async fn members(&self, group: &str) -> Result<Vec<MemberInfo>, MessengerError> {
        Ok(self.inner.profile.lock().await.members(group)?)
    }

    /// The last `limit` messages of a group, oldest first.
    pub async fn history(
        &self,
        group: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, MessengerError> {
        Ok(self.inner.profile.lock().await.history(group, limit)?)
    }

    /// Fetches and processes everything queued since the last run, in order.
    pub async fn sync(&self) -> Result<Vec<Event>, MessengerError> {
        let mut profile = self.inner.profile.lock().await;
        let events = self.sync_locked(&mut profile).await?;
        drop(profile);
        self.after_events(&events).await?;
        self.publish(&events).await;
        Ok(events)
    }

    /// Sends one outbox message and removes it once the server stored it,
    /// or refused it for good (an argument or size it will never accept).
    async fn send_from_outbox(
        &self,
        profile: &mut Profile,
        out: &Outgoing,
    ) -> Result<(), MessengerError> {
        match self.send_outgoing(profile.identity(), out).await {
            Ok(()) => Ok(profile.outbox_sent(&out.message_id)?),
            Err(e)
                if matches!(
                    e.server_code(),
                    Some(
                        ServerErrorCode::InvalidArgument
                            | ServerErrorCode::TooLarge
                            | ServerErrorCode::NotFound
                            | ServerErrorCode::Forbidden
                    )
                ) =>
            {
                tracing::warn!(error = %e, "the server refused an outbox message for good; dropped");
                profile.outbox_sent(&out.message_id)?;
                Err(e.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends what is left in the outbox (Welcomes whose first send failed),
    /// oldest first, stopping at the first failure; what is not sent stays
    /// for the next sync.
    async fn flush_outbox(&self, profile: &mut Profile) {
        let pending = match profile.outbox() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the outbox");
                return;
            }
        };
        for out in pending {
            if let Err(e) = self.send_from_outbox(profile, &out).await {
                tracing::warn!(error = %e, "outbox message not sent yet");
                return;
            }
        }
    }

    async fn sync_locked(&self, profile: &mut Profile) -> Result<Vec<Event>, MessengerError> {
        self.flush_outbox(profile).await;
        let mut events = Vec::new();
        loop {
            let next = profile.next_seq()?;
            let batch = self.client().await.fetch(next, SYNC_BATCH).await?;
            let Some(last) = batch.last().map(|e| e.seq) else {
                break;
            };
            // One transaction for the batch, cursor included.
            events.extend(process_envelopes(profile, &batch)?);
            self.client().await.ack(last).await?;
        }
        let pending = pending_groups(&events);
        for group_id in pending {
            events.extend(
                Box::pin(self.commit_with(profile, |p| {
                    p.commit_pending(&group_id)?
                        .ok_or_else(|| GroupError::Mls("nothing pending".into()))
                }))
                .await
                .or_else(|e| match e {
                    MessengerError::Group(GroupError::Mls(ref m)) if m == "nothing pending" => {
                        Ok(Vec::new())
                    }
                    e => Err(e),
                })?,
            );
        }
        Ok(events)
    }

    /// Follow-ups after processing: replenish key packages after a join.
    async fn after_events(&self, events: &[Event]) -> Result<(), MessengerError> {
        if events.iter().any(|e| matches!(e, Event::Joined { .. })) {
            self.replenish_key_packages(false).await?;
        }
        Ok(())
    }

    /// Listens for new messages via the server's push subscription, from
    /// where the last run stopped, and keeps doing so across reconnects.
    /// Direct (peer-to-peer) messages arrive on the same stream.
    pub async fn listen(&self) -> Result<EventStream, MessengerError> {
        let rx = self.inner.events.subscribe();
        self.sync().await?;
        let this = self.clone();
        let task = tokio::spawn(async move { this.listen_loop().await });
        Ok(EventStream { rx, task })
    }

    async fn listen_loop(self) {
        loop {
            let from = match self.inner.profile.lock().await.next_seq() {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the queue cursor; listener stops");
                    return;
                }
            };
            let sub = self.client().await.subscribe(from).await;
            let mut sub = match sub {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "subscribe failed; reconnecting");
                    if self
                        .reconnect(&self.inner.identity, usize::MAX)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
            };
            while let Some(env) = sub.next().await {
                let mut profile = self.inner.profile.lock().await;
                let next = profile.next_seq().unwrap_or(1);
                if env.seq < next {
                    continue; // already processed (e.g. by a concurrent sync)
                }
                let mut events = match process_envelopes(&mut profile, std::slice::from_ref(&env)) {
                    Ok(events) => events,
                    Err(e) => {
                        // Not acknowledged: the next sync fetches it again.
                        tracing::error!(error = %e, "cannot store a received message");
                        continue;
                    }
                };
                let _ = self.client().await.ack(env.seq).await;
                for group_id in pending_groups(&events) {
                    match self
                        .commit_with(&mut profile, |p| {
                            p.commit_pending(&group_id)?
                                .ok_or_else(|| GroupError::Mls("nothing pending".into()))
                        })
                        .await
                    {
                        Ok(more) => events.extend(more),
                        Err(e) => tracing::debug!(error = %e, "committing pending proposals"),
                    }
                }
                drop(profile);
                if let Err(e) = self.after_events(&events).await {
                    tracing::warn!(error = %e, "follow-up after events failed");
                }
                self.publish(&events).await;
            }
            // The subscription ended: the connection is gone. Reconnect.
            if self
                .reconnect(&self.inner.identity, usize::MAX)
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

fn pending_groups(events: &[Event]) -> Vec<Vec<u8>> {
    let mut ids: Vec<Vec<u8>> = events
        .iter()
        .filter_map(|e| match e {
            Event::ProposalsPending { group_id, .. } => Some(group_id.clone()),
            _ => None,
        })
        .collect();
    ids.dedup();
    ids
}

/// Processes envelopes in one transaction that also moves the queue cursor
/// past them; a bad one is logged and skipped (the others apply).  The error
/// is a storage failure, after which none applied.
fn process_envelopes(
    profile: &mut Profile,
    batch: &[Envelope],
) -> Result<Vec<Event>, MessengerError> {
    let delivered: Vec<Delivered<'_>> = batch
        .iter()
        .map(|env| Delivered {
            seq: env.seq,
            message_id: &env.message_id,
            payload: &env.payload,
        })
        .collect();
    let mut events = Vec::new();
    for (env, result) in batch.iter().zip(profile.process_batch(&delivered)?) {
        match result {
            Ok(more) => events.extend(more),
            Err(e) => {
                tracing::warn!(seq = env.seq, error = %e, "ignored an undecryptable or invalid message");
            }
        }
    }
    Ok(events)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StateError> + Send + 'static,
) -> Result<T, MessengerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| MessengerError::NotConfigured("profile task failed"))?
        .map_err(MessengerError::from)
}
