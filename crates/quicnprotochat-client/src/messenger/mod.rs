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
//!
//! This file is the facade: [`Messenger`], which holds the parts, and its
//! public methods, each a short composition of the parts.  `receive.rs` is
//! the facade's other half (its background loops, in an `impl Messenger`).
//! Every other part owns one job.  Imports run one way, down this list: a
//! part knows only the parts below it, and uses them through their
//! `pub(super)` functions and methods, never their fields.
//!
//! | part | job |
//! |---|---|
//! | `receive.rs` | the push listener, direct messages, publishing events and reacting to them (the facade's background half) |
//! | `routing.rs` | application messages directly to peers or through the server; peer announcements; the iroh endpoint |
//! | `commits.rs` | commits under the epoch ordering: retry after `staleEpoch`, catch up, the Welcome outbox |
//! | `inbox.rs` | fetching the queue, processing envelopes into the profile, acknowledging |
//! | `contacts.rs` | safety numbers, verified contacts, and verified contacts whose key changed |
//! | `directory.rs` | checking invitees and members against the server's directory |
//! | `files.rs` | reading a file to send, refusing it before anything is sent |
//! | `keypackages.rs` | keeping key packages on the server |
//! | `keyupdates.rs` | automatic key updates: a self-update when our keys in a group are old or have sent many messages |
//! | `supervisor.rs` | the connection: connect, authenticate, reconnect with backoff, send with one retry |
//! | `settings.rs` | the server and peer-to-peer key stored in the profile |
//! | `local.rs` | the profile behind its lock, its work on the blocking pool |
//! | `events.rs` | the event bus and [`EventStream`] |
//! | `error.rs` | [`MessengerError`] |
//!
//! Invariants:
//! - Every profile operation runs on tokio's blocking pool under the
//!   profile lock, which is held for that one local step and never across
//!   a round trip to the server ([`local::Local::run`]).  Operations
//!   interleave safely at that grain: a commit of ours is pending in the
//!   profile while it is on its way, a message from an epoch we have not
//!   merged yet is held until we have, and two readers of the queue skip
//!   what the other processed.
//! - No other lock is held across a round trip to the server: the
//!   connection is cloned out of the supervisor's lock.  The router's lock
//!   is held, as a reader, across direct sends only, and never together
//!   with the profile's.

mod commits;
mod contacts;
mod directory;
mod error;
mod events;
mod files;
mod inbox;
mod keypackages;
mod keyupdates;
mod local;
mod receive;
mod routing;
mod settings;
mod supervisor;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::MessengerError;
pub use events::EventStream;
use quicnprotochat_core::{
    Event, FileInfo, GroupSummary, IdentityKey, MemberInfo, Profile, ProfileKey, StateError,
    StoredMessage,
};
use quicnprotochat_p2p::PeerAddr;
pub use routing::P2pOptions;

use self::events::EventBus;
use self::local::Local;
use self::routing::Router;
use self::supervisor::Supervisor;
use crate::types::ClientConfig;

/// A profile connected to its server.
#[derive(Clone)]
pub struct Messenger {
    inner: Arc<Inner>,
}

struct Inner {
    /// the direct path (declared first: dropped first, closing the endpoint
    /// before anything else goes)
    router: Router,
    /// the profile, locked for one local step at a time
    local: Local,
    /// this client's username (fixed for the profile's life)
    username: String,
    /// this client's identity key
    identity_key: IdentityKey,
    /// the server connection
    link: Supervisor,
    /// where processed events go
    bus: EventBus,
    /// the profile directory (for `Debug`)
    dir: PathBuf,
}

impl std::fmt::Debug for Messenger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messenger")
            .field("profile", &self.inner.dir)
            .finish_non_exhaustive()
    }
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
        // Until the server took the name, a failure leaves nothing behind,
        // so a retry (another name, the server back up) starts clean.
        let (profile, saved) = {
            let server = server.clone();
            tokio::task::spawn_blocking(move || {
                let saved = settings::save_server(&profile, &server);
                let own_token = profile.delivery_token();
                (profile, (saved, own_token))
            })
            .await
            .map_err(|_| MessengerError::NotConfigured("profile task failed"))?
        };
        let registered = async {
            let (saved, own_token) = saved;
            saved?;
            let link =
                Supervisor::connect(server, profile.identity().clone(), own_token?, Vec::new())
                    .await?;
            link.client().await.register(username).await?;
            Ok::<_, MessengerError>(link)
        }
        .await;
        let link = match registered {
            Ok(link) => link,
            Err(e) => {
                if let Err(cleanup) = profile.discard() {
                    tracing::warn!(error = %cleanup, "could not remove the unregistered profile");
                }
                return Err(e);
            }
        };
        let m = Self::assemble(profile, link, dir);
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
        Self::open_tuned(dir, key, server, |_| {}).await
    }

    /// [`Messenger::open`], after `tune` adjusted what is not saved in the
    /// profile (the deadlines, the keep-alive) in the server configuration.
    pub async fn open_tuned(
        dir: &Path,
        key: &ProfileKey,
        server: Option<ClientConfig>,
        tune: impl FnOnce(&mut ClientConfig) + Send,
    ) -> Result<Self, MessengerError> {
        let dir_buf = dir.to_path_buf();
        let key = key.clone();
        let (profile, server, own_token, tokens) = tokio::task::spawn_blocking(move || {
            let profile = Profile::open(&dir_buf, &key)?;
            let server = match server {
                Some(s) => {
                    settings::save_server(&profile, &s)?;
                    s
                }
                None => settings::load_server(&profile)?,
            };
            let own_token = profile.delivery_token()?;
            let tokens = profile.delivery_tokens()?;
            Ok::<_, MessengerError>((profile, server, own_token, tokens))
        })
        .await
        .map_err(|_| MessengerError::NotConfigured("profile task failed"))??;
        let mut server = server;
        tune(&mut server);
        let link =
            Supervisor::connect(server, profile.identity().clone(), own_token, tokens).await?;
        Ok(Self::assemble(profile, link, dir))
    }

    fn assemble(profile: Profile, link: Supervisor, dir: &Path) -> Self {
        Self {
            inner: Arc::new(Inner {
                router: Router::new(),
                username: profile.username().to_string(),
                identity_key: profile.identity_key(),
                local: Local::new(profile),
                link,
                bus: EventBus::new(),
                dir: dir.to_path_buf(),
            }),
        }
    }

    /// This client's username.
    pub async fn username(&self) -> String {
        self.inner.username.clone()
    }

    /// This client's identity key.
    pub async fn identity_key(&self) -> IdentityKey {
        self.inner.identity_key
    }

    /// Publishes key packages when fewer than the low-water mark remain
    /// (always when `force`), plus a last-resort package when none is there.
    pub async fn replenish_key_packages(&self, force: bool) -> Result<u32, MessengerError> {
        keypackages::replenish(&self.inner.link, &self.inner.local, force).await
    }

    /// Creates a group with this client as its only member.
    pub async fn create_group(&self, name: &str) -> Result<(), MessengerError> {
        let name = name.to_string();
        self.inner.local.run(move |p| p.create_group(&name)).await?;
        Ok(())
    }

    /// Invites `username` to `group` (creating the group if it does not
    /// exist): claims one of their key packages, commits the add, routes the
    /// commit to existing members and the Welcome to the invitee.
    pub async fn invite(&self, group: &str, username: &str) -> Result<Vec<Event>, MessengerError> {
        let client = self.inner.link.client().await;
        let (invitee, kp) = directory::claim_invitee(&client, username).await?;
        let name = group.to_string();
        self.inner
            .local
            .run(move |p| {
                if !p.has_group(&name)? {
                    p.create_group(&name)?;
                }
                Ok::<_, MessengerError>(())
            })
            .await?;
        let name = group.to_string();
        let events = commits::commit_with(&self.inner.link, &self.inner.local, move |p| {
            p.add_member(&name, &kp, invitee)
        })
        .await?;
        // The new member does not know how to reach us directly yet, nor
        // our delivery token.
        self.announce(group).await?;
        self.announce_token(group, Some(&[username.to_string()]))
            .await;
        Ok(events)
    }

    /// Members of `group` whose credential names a user the server's
    /// directory binds to another key (or does not know).
    pub async fn verify_members(&self, group: &str) -> Result<Vec<MemberInfo>, MessengerError> {
        let members = self.members(group).await?;
        directory::mismatches(&self.inner.link.client().await, members).await
    }

    /// Our direct address, when peer-to-peer delivery is enabled.
    pub async fn p2p_addr(&self) -> Option<PeerAddr> {
        self.inner.router.addr().await
    }

    /// Removes `username` from `group`.
    pub async fn remove(&self, group: &str, username: &str) -> Result<Vec<Event>, MessengerError> {
        let (group, username) = (group.to_string(), username.to_string());
        commits::commit_with(&self.inner.link, &self.inner.local, move |p| {
            p.remove_member(&group, &username)
        })
        .await
    }

    /// Refreshes this client's keys in `group` (post-compromise security).
    pub async fn update(&self, group: &str) -> Result<Vec<Event>, MessengerError> {
        let group = group.to_string();
        let name = group.clone();
        let events = commits::commit_with(&self.inner.link, &self.inner.local, move |p| {
            p.self_update(&name)
        })
        .await?;
        self.inner
            .local
            .run(move |p| p.record_key_update(&group))
            .await?;
        Ok(events)
    }

    /// Leaves `group`: asks the others to remove us, forgets it locally.
    pub async fn leave(&self, group: &str) -> Result<(), MessengerError> {
        let group = group.to_string();
        if let Some(out) = self.inner.local.run(move |p| p.leave(&group)).await? {
            self.inner.link.send_outgoing(&out).await?;
        }
        Ok(())
    }

    /// Sends a text message to `group`: directly to members reachable
    /// peer-to-peer (when enabled), through the server to the rest.
    pub async fn send(&self, group: &str, text: &str) -> Result<(), MessengerError> {
        self.settle_pending_commits().await?;
        let (group, text) = (group.to_string(), text.to_string());
        let out = self
            .inner
            .local
            .run(move |p| p.send_text(&group, &text))
            .await?;
        routing::send(&self.inner.router, &self.inner.link, &self.inner.local, out).await?;
        self.update_due_keys_quietly().await;
        Ok(())
    }

    /// Sends the file at `path` to `group`, whole, in one end-to-end
    /// encrypted message (as [`Messenger::send`] sends a text): its base
    /// name, a media type guessed from its extension, its size, its SHA-256
    /// and its content.  A file that is not a regular file or is larger
    /// than [`MAX_FILE_BYTES`](quicnprotochat_core::file::MAX_FILE_BYTES)
    /// is refused before anything is sent.  Returns the file as the
    /// history keeps it.
    pub async fn send_file(&self, group: &str, path: &Path) -> Result<FileInfo, MessengerError> {
        let path = path.to_path_buf();
        let file = tokio::task::spawn_blocking(move || files::read(&path))
            .await
            .map_err(|_| MessengerError::NotConfigured("file task failed"))??;
        self.settle_pending_commits().await?;
        let group = group.to_string();
        let (out, info) = self
            .inner
            .local
            .run(move |p| {
                let media_type = quicnprotochat_core::file::media_type_for(&file.name);
                p.send_file(&group, &file.name, media_type, file.content)
            })
            .await?;
        routing::send(&self.inner.router, &self.inner.link, &self.inner.local, out).await?;
        self.update_due_keys_quietly().await;
        Ok(info)
    }

    /// A message must not go out in an epoch a commit of ours may have
    /// ended already: settles such a commit first.
    async fn settle_pending_commits(&self) -> Result<(), MessengerError> {
        if !self
            .inner
            .local
            .run(|p| p.pending_commits())
            .await?
            .is_empty()
        {
            let events = commits::resume_pending(&self.inner.link, &self.inner.local).await?;
            for e in events {
                self.inner.bus.emit(e);
            }
        }
        Ok(())
    }

    /// Where received files are saved (by default `downloads` in the
    /// profile directory).
    pub async fn download_dir(&self) -> Result<PathBuf, MessengerError> {
        self.inner
            .local
            .run(|p| Ok::<_, MessengerError>(p.download_dir().to_path_buf()))
            .await
    }

    /// Saves received files in `dir` from now on (created, mode 0700, when
    /// the first file arrives); a relative `dir` is taken from the working
    /// directory now.
    pub async fn set_download_dir(&self, dir: &Path) -> Result<(), MessengerError> {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        self.inner
            .local
            .run(move |p| {
                p.set_download_dir(dir);
                Ok::<_, MessengerError>(())
            })
            .await
    }

    /// Starts peer-to-peer delivery: binds the iroh endpoint with the
    /// profile's stable key, accepts direct messages from members of our
    /// groups, and (unless opted out) announces our address in every group.
    /// Returns our endpoint id.
    pub async fn enable_p2p(&self, options: P2pOptions) -> Result<[u8; 32], MessengerError> {
        let (secret, allowed, groups) = self
            .inner
            .local
            .run(|profile| {
                let secret = settings::p2p_secret(profile)?;
                let groups: Vec<String> = profile.groups()?.into_iter().map(|g| g.name).collect();
                Ok::<_, MessengerError>((secret, profile.allowed_endpoint_ids()?, groups))
            })
            .await?;
        let announce = options.announce;
        let this = self.clone();
        let id = self
            .inner
            .router
            .start(secret, options, allowed, |rx| {
                tokio::spawn(this.inbound_loop(rx))
            })
            .await?;
        if announce {
            for g in groups {
                self.announce(&g).await?;
            }
        }
        Ok(id)
    }

    /// Stops peer-to-peer delivery (later messages go through the server).
    pub async fn disable_p2p(&self) {
        self.inner.router.stop().await;
    }

    /// Announces our direct address to the members of `group` (through the
    /// server: they may not know us yet).
    async fn announce(&self, group: &str) -> Result<(), MessengerError> {
        routing::announce(
            &self.inner.router,
            &self.inner.link,
            &self.inner.local,
            group,
        )
        .await
    }

    /// Local groups.
    pub async fn groups(&self) -> Result<Vec<GroupSummary>, MessengerError> {
        self.inner.local.run(|p| p.groups()).await
    }

    /// Members of a group.
    pub async fn members(&self, group: &str) -> Result<Vec<MemberInfo>, MessengerError> {
        let group = group.to_string();
        self.inner.local.run(move |p| p.members(&group)).await
    }

    /// The last `limit` messages of a group, oldest first.
    pub async fn history(
        &self,
        group: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, MessengerError> {
        let group = group.to_string();
        self.inner
            .local
            .run(move |p| p.history(&group, limit))
            .await
    }

    /// Received messages not yet marked shown ([`Messenger::mark_shown`]),
    /// oldest first, at most `limit`: those processed by an earlier run (or
    /// by a sync that failed half-way) that never reached the user.
    pub async fn unshown(&self, limit: usize) -> Result<Vec<StoredMessage>, MessengerError> {
        self.inner.local.run(move |p| p.unshown(limit)).await
    }

    /// Records that `messages` reached the user: call it once they were
    /// written out (and flushed), never before, so a crash in between shows
    /// them again rather than never.
    pub async fn mark_shown(&self, messages: &[StoredMessage]) -> Result<(), MessengerError> {
        let messages = messages.to_vec();
        self.inner.local.run(move |p| p.mark_shown(&messages)).await
    }

    /// Fetches and processes everything queued since the last run, in order.
    /// The messages among the events are stored as not yet shown (see
    /// [`Messenger::unshown`]); when this fails half-way, what it processed
    /// before the failure is there too.
    pub async fn sync(&self) -> Result<Vec<Event>, MessengerError> {
        let events = commits::catch_up(&self.inner.link, &self.inner.local).await?;
        self.after_events(&events).await?;
        self.publish(&events).await;
        Ok(events)
    }

    /// Listens for new messages via the server's push subscription, from
    /// where the last run stopped, and keeps doing so across reconnects.
    /// Direct (peer-to-peer) messages arrive on the same stream.
    pub async fn listen(&self) -> Result<EventStream, MessengerError> {
        let rx = self.inner.bus.subscribe();
        self.sync().await?;
        let (listener, keys) = (self.clone(), self.clone());
        let task = tokio::spawn(async move {
            // The key-update checks end with the listener.
            tokio::select! {
                () = listener.listen_loop() => {}
                () = keys.key_update_loop() => {}
            }
        });
        Ok(EventStream::new(rx, task))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StateError> + Send + 'static,
) -> Result<T, MessengerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| MessengerError::NotConfigured("profile task failed"))?
        .map_err(MessengerError::from)
}
