//! The connection supervisor: owns the one [`Client`] the messenger talks
//! through and replaces it when the connection is lost.
//!
//! - [`Supervisor::connect`] opens a connection and authenticates the
//!   profile's identity on it (challenge, signature, token).
//! - [`Supervisor::reconnect`] opens a new one with exponential backoff and
//!   authenticates again; a push subscription belongs to its connection, so
//!   the listener subscribes again after every reconnect (`receive.rs`).
//! - Failover: a deployment of several nodes on one store is listed as the
//!   server's address and its fallbacks.  Each attempt tries every node in
//!   turn, starting with the one after the node that was lost, and keeps the
//!   first that answers; the backoff runs between whole rounds.  All nodes
//!   share the store, so the listener resumes from its cursor wherever it
//!   lands, and a retried send keeps its message id: stored once.
//! - [`Supervisor::send_outgoing`] enqueues a message, reconnecting and
//!   retrying once on a lost connection: the message id makes the retry
//!   idempotent, so the server never stores it twice.
//! - Delivery tokens (protocol section 9.10): every connection registers
//!   ours with the server, and every enqueue presents those the recipients
//!   announced to us, so our messages to fellow members never compete with
//!   strangers' for room in their queues.
//!
//! The lock around the client is held only to clone or swap the handle,
//! never across a network round trip: a caller keeps the handle it cloned,
//! and a call on a connection that died fails with a connection error.

use std::collections::HashMap;
use std::time::Duration;

use quicnprotochat_core::message::DELIVERY_TOKEN_LEN;
use quicnprotochat_core::{Identity, IdentityKey, Outgoing};
use tokio::sync::RwLock;

use crate::connection::Client;
use crate::error::ClientError;
use crate::types::ClientConfig;

/// Reconnect backoff: first delay and cap.
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Attempts to reconnect before a failed enqueue is reported.
const SEND_RECONNECT_ATTEMPTS: usize = 3;

/// A delivery token.
type Token = [u8; DELIVERY_TOKEN_LEN];

/// The messenger's connection to its server.
pub(super) struct Supervisor {
    server: ClientConfig,
    identity: Identity,
    client: RwLock<Client>,
    /// index (in [`ClientConfig::addrs`]) of the node in use
    node: std::sync::atomic::AtomicUsize,
    /// our delivery token, registered on every connection
    own_token: Token,
    /// the delivery tokens members announced to us
    tokens: RwLock<HashMap<IdentityKey, Token>>,
}

impl Supervisor {
    /// Connects to `server`, authenticates `identity` and registers its
    /// delivery token `own_token`; `tokens` are those members announced.
    pub(super) async fn connect(
        server: ClientConfig,
        identity: Identity,
        own_token: Token,
        tokens: Vec<(IdentityKey, Token)>,
    ) -> Result<Self, ClientError> {
        let (client, node) = connect_any(&server, 0, &identity, &own_token).await?;
        Ok(Self {
            server,
            identity,
            client: RwLock::new(client),
            node: std::sync::atomic::AtomicUsize::new(node),
            own_token,
            tokens: RwLock::new(tokens.into_iter().collect()),
        })
    }

    /// Remembers the delivery token `member` announced.
    pub(super) async fn learn_token(&self, member: IdentityKey, token: Token) {
        self.tokens.write().await.insert(member, token);
    }

    /// The current connection.
    pub(super) async fn client(&self) -> Client {
        self.client.read().await.clone()
    }

    /// Replaces the connection, retrying with exponential backoff until
    /// `attempts` are used up.
    pub(super) async fn reconnect(&self, attempts: usize) -> Result<(), ClientError> {
        let mut delay = BACKOFF_START;
        let mut last = ClientError::Disconnected;
        use std::sync::atomic::Ordering;
        for _ in 0..attempts.max(1) {
            // The node in use was lost: start with the next one.
            let start = self.node.load(Ordering::Relaxed) + 1;
            match connect_any(&self.server, start, &self.identity, &self.own_token).await {
                Ok((c, node)) => {
                    *self.client.write().await = c;
                    self.node.store(node, Ordering::Relaxed);
                    tracing::info!(server = %c_addr(&self.server, node), "reconnected");
                    return Ok(());
                }
                Err(e) => {
                    let wait = jittered(delay);
                    tracing::debug!(error = %e, ?wait, "reconnect failed");
                    last = e;
                    tokio::time::sleep(wait).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
            }
        }
        Err(last)
    }

    /// Sends `out` to the server (enqueue) with one reconnect-and-retry on a
    /// lost connection (safe: the message id makes the retry idempotent).
    pub(super) async fn send_outgoing(&self, out: &Outgoing) -> Result<(), ClientError> {
        if out.recipients.is_empty() {
            return Ok(());
        }
        let first = self.enqueue(out).await;
        match first {
            Err(e) if is_connection_error(&e) => {
                self.reconnect(SEND_RECONNECT_ATTEMPTS).await?;
                self.enqueue(out).await
            }
            r => r,
        }
    }

    /// Enqueues `out`, waiting out `rateLimited` answers (bounded): what a
    /// user typed is sent late rather than dropped.
    async fn enqueue(&self, out: &Outgoing) -> Result<(), ClientError> {
        let tokens: Vec<Option<Token>> = {
            let known = self.tokens.read().await;
            out.recipients
                .iter()
                .map(|r| known.get(r).copied())
                .collect()
        };
        let mut waited = Duration::ZERO;
        loop {
            let sent = self
                .client()
                .await
                .enqueue_with_tokens(
                    &out.recipients,
                    &tokens,
                    out.message_id,
                    out.payload.clone(),
                )
                .await;
            match sent {
                Ok(_) => return Ok(()),
                Err(e) => crate::connection::wait_out(e, &mut waited).await?,
            }
        }
    }
}

/// A wait drawn uniformly from the upper half of `delay` ("equal
/// jitter"), so clients cut off together by a server restart do not all
/// come back in the same instant.  Without randomness (the RNG failing) it
/// is `delay` itself.
fn jittered(delay: Duration) -> Duration {
    let mut b = [0u8; 4];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return delay;
    }
    let fraction = f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX);
    delay / 2 + delay.mul_f64(fraction / 2.0)
}

/// The address of node `index`.
fn c_addr(server: &ClientConfig, index: usize) -> std::net::SocketAddr {
    let addrs = server.addrs();
    addrs
        .get(index % addrs.len().max(1))
        .copied()
        .unwrap_or(server.server_addr)
}

/// Connects to the first node that answers, trying each once from node
/// `start` on (modulo their number); returns the connection and the node's
/// index.  The error is the last node's.
async fn connect_any(
    server: &ClientConfig,
    start: usize,
    identity: &Identity,
    own_token: &Token,
) -> Result<(Client, usize), ClientError> {
    let addrs = server.addrs();
    let mut last = ClientError::Disconnected;
    for k in 0..addrs.len() {
        let index = (start + k) % addrs.len();
        let Some(addr) = addrs.get(index) else {
            continue;
        };
        match connect(&server.at(*addr), identity, own_token).await {
            Ok(c) => return Ok((c, index)),
            Err(e) if is_connection_error(&e) => {
                tracing::debug!(%addr, error = %e, "node unreachable");
                last = e;
            }
            // Refused by a node that answered (a wrong token, say): the
            // others share its configuration, so they would refuse too.
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

async fn connect(
    server: &ClientConfig,
    identity: &Identity,
    own_token: &Token,
) -> Result<Client, ClientError> {
    let client = Client::connect(server.clone()).await?;
    client.init_auth(identity).await?;
    // A server of wire version 1 does not know the method: messages to us
    // then all count alike, as before.
    if let Err(e) = client.set_delivery_token(own_token).await {
        tracing::debug!(error = %e, "the server did not take our delivery token");
    }
    Ok(client)
}

fn is_connection_error(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Disconnected
            | ClientError::Rpc(_)
            | ClientError::Connect { .. }
            | ClientError::Unreachable { .. }
            | ClientError::Timeout { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_waits_are_spread_over_the_upper_half_of_the_delay() {
        let delay = Duration::from_millis(1000);
        let waits: Vec<Duration> = (0..200).map(|_| jittered(delay)).collect();
        assert!(waits.iter().all(|w| *w >= delay / 2 && *w <= delay));
        let distinct: std::collections::HashSet<_> = waits.iter().collect();
        assert!(
            distinct.len() > 150,
            "waits are not spread: {}",
            distinct.len()
        );
        let (lo, hi) = (
            waits
                .iter()
                .filter(|w| **w < Duration::from_millis(750))
                .count(),
            waits
                .iter()
                .filter(|w| **w >= Duration::from_millis(750))
                .count(),
        );
        assert!(lo > 40 && hi > 40, "lower {lo}, upper {hi}");
    }
}
