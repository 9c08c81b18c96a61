//! Client errors.

use std::time::Duration;

/// Stable error codes the server sends (mirrors the schema's `ErrorCode`;
/// the mapping is in `connection.rs`, the client's one Cap'n Proto module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerErrorCode {
    /// bad token or identity proof, or no challenge outstanding
    Unauthenticated,
    /// authenticated but not allowed
    Forbidden,
    /// malformed or out-of-range argument
    InvalidArgument,
    /// above a size or count cap
    TooLarge,
    /// rate limited; retry later
    RateLimited,
    /// a recipient's queue is full; nothing was stored
    QueueFull,
    /// no such thing
    NotFound,
    /// incompatible wire versions
    VersionMismatch,
    /// server-side failure
    Internal,
    /// conflicts with existing state
    Conflict,
    /// a commit for an epoch that already has one
    StaleEpoch,
    /// a code this client does not know
    Unknown,
}

/// Errors of client operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// could not establish the QUIC/TLS connection
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// server address
        addr: std::net::SocketAddr,
        /// cause
        reason: String,
    },
    /// the server answered with a typed error
    #[error("server refused ({code:?}): {message}")]
    Server {
        /// stable code
        code: ServerErrorCode,
        /// the server's safe message
        message: String,
        /// for `RateLimited`: when to retry
        retry_after: Option<Duration>,
    },
    /// a session method was called before `init_auth` succeeded
    #[error("not authenticated: call init_auth first")]
    NotAuthenticated,
    /// the RPC transport failed (connection lost, protocol error)
    #[error("rpc failed: {0}")]
    Rpc(String),
    /// the connection worker is gone (closed or disconnected)
    #[error("disconnected from the server")]
    Disconnected,
    /// connecting got no answer within the deadline: the server is down or
    /// out of reach
    #[error("server {addr} unreachable: no answer within {} s", after.as_secs_f32())]
    Unreachable {
        /// server address
        addr: std::net::SocketAddr,
        /// the deadline that passed
        after: Duration,
    },
    /// a call got no answer within the deadline
    #[error("the server did not answer within {} s", after.as_secs_f32())]
    Timeout {
        /// the deadline that passed
        after: Duration,
    },
    /// the server sent something that violates the protocol
    #[error("invalid response from server: {0}")]
    InvalidResponse(&'static str),
    /// signing with the identity key failed
    #[error("identity: {0}")]
    Identity(#[from] quicnprotochat_core::IdentityError),
}

impl ClientError {
    /// For a `rateLimited` refusal, how long to wait before the call can
    /// succeed (at least 1 ms).
    pub fn rate_limited_for(&self) -> Option<Duration> {
        match self {
            Self::Server {
                code: ServerErrorCode::RateLimited,
                retry_after,
                ..
            } => Some(retry_after.unwrap_or(Duration::from_millis(1))),
            _ => None,
        }
    }

    /// The server's error code, if this is a server-side refusal.
    pub fn server_code(&self) -> Option<ServerErrorCode> {
        match self {
            Self::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}
