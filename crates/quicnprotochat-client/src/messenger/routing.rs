//! Routing of application messages: directly to members we can reach
//! peer-to-peer (iroh), through the server to the rest; and the
//! announcements that tell members how to reach us.
//!
//! Invariants: only application messages take the direct path.  Commits,
//! proposals and Welcomes always go through the server, whose
//! one-commit-per-epoch ordering keeps every member on the same epoch, and
//! a direct message of another kind is refused ([`admissible`]).  Inbound
//! connections are accepted only from endpoint ids announced inside our
//! groups ([`Router::allow_announced`]).
//!
//! The profile is read (peer addresses) or written (an announcement) in
//! one local step before the round trips, never held across them; the
//! router's lock is held, as a reader, across direct sends only.

use quicnprotochat_core::mls_header::{self, FrameKind};
use quicnprotochat_core::{Event, IdentityKey, Outgoing, PeerInfo};
use quicnprotochat_p2p::{Inbound, Node, NodeConfig, P2pError, PeerAddr};
use tokio::sync::{RwLock, mpsc};
use tokio::task::JoinHandle;

use super::error::MessengerError;
use super::local::Local;
use super::supervisor::Supervisor;

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

/// A running direct path.
struct P2p {
    node: Node,
    options: P2pOptions,
    /// the task processing what the node receives
    inbound: JoinHandle<()>,
}

/// The direct path, when enabled.
pub(super) struct Router {
    p2p: RwLock<Option<P2p>>,
}

impl Router {
    /// A router with the direct path off.
    pub(super) fn new() -> Self {
        Self {
            p2p: RwLock::new(None),
        }
    }

    /// Binds an iroh endpoint with `secret`, accepts connections from
    /// `allowed`, and hands what it receives to the task `serve` spawns.
    /// Replaces (and closes) a running endpoint.  Returns our endpoint id.
    pub(super) async fn start(
        &self,
        secret: [u8; 32],
        options: P2pOptions,
        allowed: Vec<[u8; 32]>,
        serve: impl FnOnce(mpsc::Receiver<Inbound>) -> JoinHandle<()>,
    ) -> Result<[u8; 32], P2pError> {
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
        let inbound = serve(rx);
        if let Some(old) = self.p2p.write().await.replace(P2p {
            node,
            options,
            inbound,
        }) {
            old.inbound.abort();
            old.node.close().await;
        }
        Ok(id)
    }

    /// Stops the direct path (later messages go through the server).
    pub(super) async fn stop(&self) {
        if let Some(p2p) = self.p2p.write().await.take() {
            p2p.inbound.abort();
            p2p.node.close().await;
        }
    }

    /// Our direct address, when the direct path is on.
    pub(super) async fn addr(&self) -> Option<PeerAddr> {
        self.p2p.read().await.as_ref().map(|p| p.node.addr())
    }

    /// Accepts direct connections from the peers announced in `events`.
    pub(super) async fn allow_announced(&self, events: &[Event]) {
        let p2p = self.p2p.read().await;
        let Some(p) = p2p.as_ref() else {
            return;
        };
        for e in events {
            if let Event::PeerAnnounced { endpoint_id, .. } = e {
                p.node.allow(*endpoint_id);
            }
        }
    }

    /// Whether the direct path is on.
    async fn enabled(&self) -> bool {
        self.p2p.read().await.is_some()
    }

    /// Tries the direct path for every recipient with a known address
    /// (`known`, read from the profile); returns the recipients that still
    /// need the server.
    async fn send_direct(
        &self,
        known: Vec<(IdentityKey, Option<PeerInfo>)>,
        out: &Outgoing,
    ) -> Vec<IdentityKey> {
        let p2p = self.p2p.read().await;
        let Some(p2p) = p2p.as_ref() else {
            return out.recipients.clone();
        };
        let mut attempts = Vec::new();
        let mut remaining = Vec::new();
        for (r, peer) in known {
            match peer {
                Some(peer) => attempts.push((r, to_peer_addr(&peer))),
                None => remaining.push(r),
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

    /// Our address to announce: `None` when the direct path is off or we
    /// opted out of announcing.
    async fn announced_addr(&self) -> Option<PeerInfo> {
        let p2p = self.p2p.read().await;
        match p2p.as_ref() {
            Some(p) if p.options.announce => Some(from_peer_addr(&p.node.addr())),
            _ => None,
        }
    }
}

impl Drop for Router {
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

/// Sends the application message `out`: directly to the recipients we can
/// reach, through the server to the others.
pub(super) async fn send(
    router: &Router,
    link: &Supervisor,
    local: &Local,
    out: Outgoing,
) -> Result<(), MessengerError> {
    let remaining = if router.enabled().await {
        let recipients = out.recipients.clone();
        let known = local
            .run(move |p| {
                Ok::<_, MessengerError>(
                    recipients
                        .into_iter()
                        .map(|r| (r, p.peer(r).ok().flatten()))
                        .collect::<Vec<_>>(),
                )
            })
            .await?;
        router.send_direct(known, &out).await
    } else {
        out.recipients.clone()
    };
    if !remaining.is_empty() {
        let rest = Outgoing {
            recipients: remaining,
            ..out
        };
        link.send_outgoing(&rest).await?;
    }
    Ok(())
}

/// Announces our direct address to the members of `group` (through the
/// server: they may not know us yet).
pub(super) async fn announce(
    router: &Router,
    link: &Supervisor,
    local: &Local,
    group: &str,
) -> Result<(), MessengerError> {
    let Some(peer) = router.announced_addr().await else {
        return Ok(());
    };
    let group = group.to_string();
    if let Some(out) = local.run(move |p| p.announce_peer(&group, &peer)).await? {
        link.send_outgoing(&out).await?;
    }
    Ok(())
}

/// Whether a direct message may be processed: only application messages
/// may bypass the server (commits need its one-per-epoch ordering).
pub(super) fn admissible(m: &Inbound) -> bool {
    mls_header::inspect(&m.payload).kind == FrameKind::Application
}

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
