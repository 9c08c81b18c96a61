//! Direct peer-to-peer delivery over iroh.
//!
//! A [`Node`] is an iroh endpoint with quicnprotochat's own ALPN, the ring
//! crypto provider, and relays and address lookup **disabled** unless a relay
//! URL is given: it works on a machine with no internet, over loopback and
//! LAN addresses.  Its endpoint id is an Ed25519 key the caller keeps (the
//! client keeps it in its encrypted profile), so the id is stable.
//!
//! What travels here is exactly what would otherwise go through the delivery
//! server: opaque MLS ciphertext with its delivery message id.  One
//! bidirectional stream carries one message:
//!
//! ```text
//! sender → receiver: u32 big-endian length L, then L bytes = message id (16) ‖ payload
//! receiver → sender: one byte, 1 = processed and stored, 0 = refused
//! ```
//!
//! The receiver answers only after the application handled the message
//! ([`Inbound::accept`]), so an acknowledged direct delivery is as durable as
//! an acknowledged server enqueue; anything else makes the sender fall back
//! to the server.
//!
//! Inbound connections are accepted only from endpoint ids the application
//! allowed ([`Node::allow`]: ids announced inside one of its MLS groups);
//! others are closed right after the handshake, before any stream is read.
//! Every peer is limited in message size and rate.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use iroh::endpoint::{Connection, VarInt, presets};
use iroh::{Endpoint, EndpointAddr, EndpointId, RelayMode, RelayUrl, SecretKey};
use tokio::sync::{mpsc, oneshot};

/// ALPN of the direct path, with its major version.
pub const ALPN: &[u8] = b"quicnprotochat/p2p/1";

/// Largest direct message (id + payload).  Application messages are small;
/// commits and Welcomes always go through the server.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Per-peer inbound rate: 50 messages/s, bursts of 200.
pub const DEFAULT_PEER_RATE: (u32, u32) = (50, 200);

/// How long a sender waits for the receiver's acknowledgement before giving
/// up on the direct path (and falling back to the server).
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(3);

/// Inbound messages waiting for the application before peers are slowed down.
const INBOUND_QUEUE: usize = 256;

/// Close code for a refused connection (unknown endpoint id).
pub const REFUSED: u32 = 1;

/// Errors of the direct path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum P2pError {
    /// binding the endpoint failed
    #[error("cannot start the p2p endpoint: {0}")]
    Bind(String),
    /// the relay URL is not a URL
    #[error("invalid relay URL: {0}")]
    RelayUrl(String),
    /// the peer could not be reached
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// the peer did not acknowledge in time
    #[error("peer did not acknowledge within {0:?}")]
    Timeout(Duration),
    /// the peer refused the message
    #[error("peer refused the message")]
    Refused,
    /// the message is over the size limit
    #[error("message of {0} bytes is over the direct-path limit")]
    TooLarge(usize),
    /// a stream failed mid-message
    #[error("stream failed: {0}")]
    Stream(String),
    /// a key is malformed
    #[error("invalid endpoint id")]
    BadId,
}

/// Options of a [`Node`].
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// local UDP address (loopback for tests, `0.0.0.0:0` for LAN peers)
    pub bind: SocketAddr,
    /// relay server URL (none: relays disabled)
    pub relay_url: Option<String>,
    /// largest inbound message
    pub max_message_bytes: usize,
    /// per-peer inbound (per second, burst)
    pub peer_rate: (u32, u32),
    /// acknowledgement timeout when sending
    pub send_timeout: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            relay_url: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            peer_rate: DEFAULT_PEER_RATE,
            send_timeout: DEFAULT_SEND_TIMEOUT,
        }
    }
}

/// How to reach a peer: its endpoint id and socket addresses (and the relay,
/// if it uses one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    /// endpoint id (Ed25519 public key)
    pub id: [u8; 32],
    /// direct addresses
    pub addrs: Vec<SocketAddr>,
    /// relay URL
    pub relay_url: Option<String>,
}

impl PeerAddr {
    fn to_iroh(&self) -> Result<EndpointAddr, P2pError> {
        let id = EndpointId::from_bytes(&self.id).map_err(|_| P2pError::BadId)?;
        let mut addr = EndpointAddr::new(id);
        for a in &self.addrs {
            addr = addr.with_ip_addr(*a);
        }
        if let Some(url) = &self.relay_url {
            let url: RelayUrl = url.parse().map_err(|_| P2pError::RelayUrl(url.clone()))?;
            addr = addr.with_relay_url(url);
        }
        Ok(addr)
    }
}

/// A message that arrived directly.  Call [`Inbound::accept`] once it is
/// processed and stored, or [`Inbound::reject`]; dropping it rejects.
#[derive(Debug)]
pub struct Inbound {
    /// sender's endpoint id (authenticated by the QUIC handshake)
    pub from: [u8; 32],
    /// delivery message id
    pub message_id: [u8; 16],
    /// MLS ciphertext
    pub payload: Vec<u8>,
    ack: oneshot::Sender<bool>,
}

impl Inbound {
    /// Tells the sender the message is processed and stored.
    pub fn accept(self) {
        let _ = self.ack.send(true);
    }

    /// Tells the sender the message was not taken (it will use the server).
    pub fn reject(self) {
        let _ = self.ack.send(false);
    }
}

type Allowed = Arc<Mutex<HashSet<EndpointId>>>;

/// A direct-delivery endpoint.
#[derive(Debug, Clone)]
pub struct Node {
    endpoint: Endpoint,
    allowed: Allowed,
    conns: Arc<tokio::sync::Mutex<HashMap<EndpointId, Connection>>>,
    config: NodeConfig,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The set is only inserted into and read; a panic elsewhere cannot leave
    // it half-updated, so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Node {
    /// Binds the endpoint with the stable `secret` key; inbound messages
    /// arrive on the returned receiver.
    pub async fn bind(
        secret: [u8; 32],
        config: NodeConfig,
    ) -> Result<(Self, mpsc::Receiver<Inbound>), P2pError> {
        let mut builder = Endpoint::builder(presets::Minimal)
            .clear_ip_transports()
            .bind_addr(config.bind)
            .map_err(|e| P2pError::Bind(e.to_string()))?
            .secret_key(SecretKey::from_bytes(&secret))
            .alpns(vec![ALPN.to_vec()]);
        builder = match &config.relay_url {
            None => builder.relay_mode(RelayMode::Disabled),
            Some(url) => {
                let url: RelayUrl = url.parse().map_err(|_| P2pError::RelayUrl(url.clone()))?;
                builder.relay_mode(RelayMode::Custom(url.into()))
            }
        };
        let endpoint = builder
            .bind()
            .await
            .map_err(|e| P2pError::Bind(e.to_string()))?;
        let node = Self {
            endpoint,
            allowed: Arc::new(Mutex::new(HashSet::new())),
            conns: Arc::new(tokio::sync::Mutex::new(HashMap::new())),
            config,
        };
        let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
        tokio::spawn(node.clone().accept_loop(tx));
        Ok((node, rx))
    }

    /// This node's endpoint id.
    pub fn id(&self) -> [u8; 32] {
        *self.endpoint.id().as_bytes()
    }

    /// How peers reach this node.
    pub fn addr(&self) -> PeerAddr {
        // Bound to a wildcard address, the socket address says nothing about
        // how to reach us: use the interface addresses iroh discovered.
        let addrs = if self.config.bind.ip().is_unspecified() {
            self.endpoint.addr().ip_addrs().copied().collect()
        } else {
            self.endpoint.bound_sockets()
        };
        PeerAddr {
            id: self.id(),
            addrs,
            relay_url: self.config.relay_url.clone(),
        }
    }

    /// Accepts inbound connections from `id` from now on.
    pub fn allow(&self, id: [u8; 32]) {
        if let Ok(id) = EndpointId::from_bytes(&id) {
            lock(&self.allowed).insert(id);
        }
    }

    fn is_allowed(&self, id: &EndpointId) -> bool {
        lock(&self.allowed).contains(id)
    }

    /// Shuts the endpoint down.
    pub async fn close(&self) {
        self.endpoint.close().await;
    }

    async fn connection(&self, peer: &PeerAddr) -> Result<Connection, P2pError> {
        let addr = peer.to_iroh()?;
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&addr.id)
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let c = self
            .endpoint
            .connect(addr.clone(), ALPN)
            .await
            .map_err(|e| P2pError::Unreachable(e.to_string()))?;
        conns.insert(addr.id, c.clone());
        Ok(c)
    }

    /// Delivers one message to `peer` and waits for its acknowledgement.
    pub async fn send(
        &self,
        peer: &PeerAddr,
        message_id: [u8; 16],
        payload: &[u8],
    ) -> Result<(), P2pError> {
        let len = 16 + payload.len();
        if len > self.config.max_message_bytes {
            return Err(P2pError::TooLarge(len));
        }
        let timeout = self.config.send_timeout;
        let attempt = async {
            let conn = self.connection(peer).await?;
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| P2pError::Stream(e.to_string()))?;
            let header = u32::try_from(len)
                .map_err(|_| P2pError::TooLarge(len))?
                .to_be_bytes();
            let io = |e: std::io::Error| P2pError::Stream(e.to_string());
            send.write_all(&header)
                .await
                .map_err(|e| P2pError::Stream(e.to_string()))?;
            send.write_all(&message_id)
                .await
                .map_err(|e| P2pError::Stream(e.to_string()))?;
            send.write_all(payload)
                .await
                .map_err(|e| P2pError::Stream(e.to_string()))?;
            send.finish().map_err(|e| P2pError::Stream(e.to_string()))?;
            let mut ack = [0u8; 1];
            recv.read_exact(&mut ack)
                .await
                .map_err(|e| io(std::io::Error::other(e.to_string())))?;
            if ack[0] == 1 {
                Ok(())
            } else {
                Err(P2pError::Refused)
            }
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(P2pError::Timeout(timeout)),
        };
        if result.is_err()
            && let Ok(addr) = peer.to_iroh()
        {
            // Drop a cached connection that failed, so the next try redials.
            self.conns.lock().await.remove(&addr.id);
        }
        result
    }

    async fn accept_loop(self, tx: mpsc::Sender<Inbound>) {
        let (per_second, burst) = self.config.peer_rate;
        let quota = Quota::per_second(NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        let limiter: Arc<DefaultKeyedRateLimiter<EndpointId>> = Arc::new(RateLimiter::keyed(quota));
        while let Some(incoming) = self.endpoint.accept().await {
            let node = self.clone();
            let tx = tx.clone();
            let limiter = limiter.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "p2p handshake failed");
                        return;
                    }
                };
                let peer = conn.remote_id();
                if !node.is_allowed(&peer) {
                    tracing::info!(peer = %peer, "p2p connection refused: endpoint id not announced in any group");
                    conn.close(VarInt::from_u32(REFUSED), b"unknown endpoint id");
                    return;
                }
                node.serve_peer(conn, peer, tx, limiter).await;
            });
        }
    }

    async fn serve_peer(
        &self,
        conn: Connection,
        peer: EndpointId,
        tx: mpsc::Sender<Inbound>,
        limiter: Arc<DefaultKeyedRateLimiter<EndpointId>>,
    ) {
        // One message at a time per connection: bounded work per peer.
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let mut header = [0u8; 4];
            if recv.read_exact(&mut header).await.is_err() {
                break;
            }
            let len = u32::from_be_bytes(header) as usize;
            let ok = len >= 16
                && len <= self.config.max_message_bytes
                && limiter.check_key(&peer).is_ok();
            if !ok {
                tracing::debug!(peer = %peer, len, "p2p message refused (size or rate)");
                let _ = send.write_all(&[0]).await;
                let _ = send.finish();
                continue;
            }
            let mut body = vec![0u8; len];
            if recv.read_exact(&mut body).await.is_err() {
                break;
            }
            let mut message_id = [0u8; 16];
            message_id.copy_from_slice(&body[..16]);
            let payload = body.split_off(16);
            let (ack_tx, ack_rx) = oneshot::channel();
            let inbound = Inbound {
                from: *peer.as_bytes(),
                message_id,
                payload,
                ack: ack_tx,
            };
            if tx.send(inbound).await.is_err() {
                break;
            }
            let accepted = ack_rx.await.unwrap_or(false);
            let _ = send.write_all(&[u8::from(accepted)]).await;
            let _ = send.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn node() -> (Node, mpsc::Receiver<Inbound>) {
        let mut secret = [0u8; 32];
        secret
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = rand_byte(i));
        Node::bind(secret, NodeConfig::default()).await.unwrap()
    }

    fn rand_byte(i: usize) -> u8 {
        // Distinct keys per call without a RNG dependency.
        static COUNTER: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
        COUNTER
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .wrapping_mul(31)
            .wrapping_add(i as u8)
    }

    #[tokio::test]
    async fn allowed_peers_deliver_and_get_an_acknowledgement() {
        let (a, _a_rx) = node().await;
        let (b, mut b_rx) = node().await;
        b.allow(a.id());
        let sender = tokio::spawn({
            let a = a.clone();
            let to = b.addr();
            async move { a.send(&to, [7; 16], b"ciphertext").await }
        });
        let m = tokio::time::timeout(Duration::from_secs(10), b_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (m.from, m.message_id, m.payload.as_slice()),
            (a.id(), [7; 16], b"ciphertext".as_slice())
        );
        m.accept();
        sender.await.unwrap().unwrap();
        // A rejected message is an error for the sender.
        let sender = tokio::spawn({
            let a = a.clone();
            let to = b.addr();
            async move { a.send(&to, [8; 16], b"second").await }
        });
        b_rx.recv().await.unwrap().reject();
        assert!(matches!(sender.await.unwrap(), Err(P2pError::Refused)));
        a.close().await;
        b.close().await;
    }

    #[tokio::test]
    async fn unknown_endpoint_ids_are_refused() {
        let (a, _a_rx) = node().await;
        let (b, mut b_rx) = node().await;
        // b never allowed a.
        let r = a.send(&b.addr(), [1; 16], b"let me in").await;
        assert!(r.is_err(), "an unannounced peer must be refused, got {r:?}");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), b_rx.recv())
                .await
                .is_err()
        );
        a.close().await;
        b.close().await;
    }

    #[tokio::test]
    async fn oversized_and_flooding_peers_are_limited() {
        let (a, _a_rx) = node().await;
        let cfg = NodeConfig {
            max_message_bytes: 1024,
            peer_rate: (1, 3),
            ..NodeConfig::default()
        };
        let mut secret = [0u8; 32];
        secret[0] = 0xee;
        let (b, mut b_rx) = Node::bind(secret, cfg).await.unwrap();
        b.allow(a.id());
        // The sender's own limit is the default; b refuses the big one.
        assert!(matches!(
            a.send(&b.addr(), [1; 16], &vec![0; 2048]).await,
            Err(P2pError::Refused)
        ));
        tokio::spawn(async move {
            while let Some(m) = b_rx.recv().await {
                m.accept();
            }
        });
        let mut refused = 0;
        for i in 0..6u8 {
            if a.send(&b.addr(), [i; 16], b"x").await.is_err() {
                refused += 1;
            }
        }
        assert!(
            refused >= 2,
            "the burst of 3 per peer must be enforced, refused {refused}"
        );
        a.close().await;
        b.close().await;
    }
}
