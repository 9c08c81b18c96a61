//! The client's plain Rust types: how to reach a server ([`ClientConfig`])
//! and what its calls return.
//!
//! Nothing here knows Cap'n Proto: `connection.rs` converts between these
//! types and the wire, and is the client's only module that may (the tidy
//! test `only_proto_and_one_adapter_per_side_know_capnp` enforces it).

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use quicnprotochat_core::IdentityKey;
use quicnprotochat_proto::limits::{DELIVERY_TOKEN_LEN, NONCE_LEN};
use quicnprotochat_proto::transport::ServerAuth;
use quicnprotochat_proto::{ALPN, WIRE_VERSION, auth};

/// Client keep-alive: under half the server's 60 s idle timeout.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// How long connecting (QUIC and TLS handshake, RPC stream) may take before
/// the server counts as unreachable.  A handshake to a server that is down
/// gets no answer at all; without a deadline it waits for QUIC's idle
/// timeout (30 s).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one call may wait for its answer: longer than the server's own
/// store deadline (15 s by default), so a slow server answers `internal`
/// before the client gives up.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// How to reach and authenticate to a server.
#[derive(Clone)]
pub struct ClientConfig {
    /// server UDP address
    pub server_addr: SocketAddr,
    /// other nodes of the same deployment (same certificate trust, same
    /// store): tried in turn when the one in use is unreachable
    pub fallback_addrs: Vec<SocketAddr>,
    /// TLS server name (SNI; checked against the certificate with CA roots)
    pub server_name: String,
    /// how the server certificate is verified
    pub server_auth: ServerAuth,
    /// the deployment's access token
    pub access_token: Vec<u8>,
    /// wire version announced (tests override it)
    pub wire_version: u16,
    /// ALPN offered (tests override it)
    pub alpn: Vec<u8>,
    /// QUIC keep-alive interval
    pub keep_alive: Duration,
    /// deadline for connecting (see [`DEFAULT_CONNECT_TIMEOUT`])
    pub connect_timeout: Duration,
    /// deadline for each call's answer (see [`DEFAULT_CALL_TIMEOUT`])
    pub call_timeout: Duration,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("server_addr", &self.server_addr)
            .field("fallback_addrs", &self.fallback_addrs)
            .field("server_name", &self.server_name)
            .field("server_auth", &self.server_auth)
            .field("access_token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// A configuration with protocol defaults.
    pub fn new(
        server_addr: SocketAddr,
        server_auth: ServerAuth,
        access_token: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            server_addr,
            fallback_addrs: Vec::new(),
            server_name: "localhost".into(),
            server_auth,
            access_token: access_token.into(),
            wire_version: WIRE_VERSION,
            alpn: ALPN.to_vec(),
            keep_alive: DEFAULT_KEEP_ALIVE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            call_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }
}

impl ClientConfig {
    /// Every node's address: the server's, then the fallbacks.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let mut all = vec![self.server_addr];
        all.extend(
            self.fallback_addrs
                .iter()
                .filter(|a| **a != self.server_addr),
        );
        all
    }

    /// This configuration aimed at `addr` (one node of the deployment).
    pub fn at(&self, addr: SocketAddr) -> Self {
        Self {
            server_addr: addr,
            ..self.clone()
        }
    }
}

/// `Service.health` result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// ready
    pub ok: bool,
    /// server software version
    pub server_version: String,
    /// server wire version
    pub wire_version: u16,
    /// the store answered
    pub store_reachable: bool,
}

/// A queued message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// per-recipient sequence number
    pub seq: u64,
    /// sender-chosen id
    pub message_id: Vec<u8>,
    /// opaque ciphertext
    pub payload: Vec<u8>,
    /// server receive time, Unix ms
    pub enqueued_at_ms: u64,
    /// the store incarnation `seq` belongs to (empty from a server of wire
    /// version 1)
    pub incarnation: Vec<u8>,
}

/// A `fetch` result: the messages and the store incarnation their sequence
/// numbers belong to (given also when there are none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// the store incarnation (empty from a server of wire version 1)
    pub incarnation: Vec<u8>,
    /// the messages, ascending
    pub messages: Vec<Envelope>,
}

/// A server challenge bound to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthChallenge {
    /// the server's single-use nonce
    pub nonce: [u8; NONCE_LEN],
    /// TLS keying material exported from this connection
    pub exporter: [u8; auth::EXPORTER_LEN],
}

impl AuthChallenge {
    /// The bytes to sign with the identity key.
    pub fn transcript(&self, key: &IdentityKey) -> Vec<u8> {
        auth::transcript(&self.nonce, &self.exporter, key.as_bytes())
    }
}

/// One message of [`crate::Client::enqueue_batch`]: what one
/// [`crate::Client::enqueue_with_tokens`] takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// its recipients (no repeats)
    pub recipients: Vec<IdentityKey>,
    /// empty, or per recipient the delivery token it announced to us
    pub tokens: Vec<Option<[u8; DELIVERY_TOKEN_LEN]>>,
    /// the sender's id for it (retries keep it)
    pub message_id: [u8; 16],
    /// the ciphertext
    pub payload: Vec<u8>,
}

/// Result of an enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnqueueResult {
    /// stored; per-recipient sequence numbers
    Stored(Vec<u64>),
    /// this (sender, message id) was already stored
    Duplicate,
}
