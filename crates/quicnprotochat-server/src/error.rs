//! Errors of the delivery service.
//!
//! - [`ApiError`] is what a request can fail with.  The RPC adapter
//!   (`rpc.rs`) is the only place that turns one into a wire `Error`: a
//!   stable code and this safe message.  Internal details are logged there
//!   and never sent.
//! - [`ServerError`] is what start-up can fail with; each names the setting or
//!   file at fault.

use std::time::Duration;

use crate::config::ConfigError;
use crate::store::StoreError;

/// A failed request.
#[derive(Debug, Clone)]
pub(crate) enum ApiError {
    Unauthenticated(&'static str),
    Forbidden(&'static str),
    InvalidArgument(String),
    TooLarge(String),
    RateLimited {
        retry_after: Duration,
    },
    QueueFull(String),
    NotFound(&'static str),
    VersionMismatch {
        client: u16,
    },
    Conflict(&'static str),
    StaleEpoch(String),
    /// Logged with its detail; the peer sees only "internal error".
    Internal(String),
}

impl ApiError {
    /// The safe, human-readable message sent with the error code.
    pub(crate) fn message(&self) -> String {
        match self {
            Self::Unauthenticated(m)
            | Self::Forbidden(m)
            | Self::NotFound(m)
            | Self::Conflict(m) => (*m).to_string(),
            Self::InvalidArgument(m)
            | Self::TooLarge(m)
            | Self::QueueFull(m)
            | Self::StaleEpoch(m) => m.clone(),
            Self::RateLimited { .. } => "rate limited".into(),
            Self::VersionMismatch { client } => format!(
                "wire version mismatch: server speaks {}, client {client}",
                quicnprotochat_proto::WIRE_VERSION
            ),
            Self::Internal(_) => "internal error".into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::Internal(e.to_string())
    }
}

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// configuration is invalid or refused
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// production mode refuses a setting
    #[error("refusing to start in production mode: {setting}: {reason}")]
    Production {
        /// the setting at fault
        setting: &'static str,
        /// why
        reason: String,
    },
    /// the store failed to open
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// a file could not be read or written
    #[error("{what} ({path}): {source}")]
    File {
        /// what the file is
        what: &'static str,
        /// path
        path: String,
        /// cause
        source: std::io::Error,
    },
    /// TLS material is unusable
    #[error("TLS: {0}")]
    Tls(String),
    /// a transport setting is out of the range QUIC allows
    #[error("{setting}: {reason}")]
    Transport {
        /// the setting at fault
        setting: &'static str,
        /// why
        reason: &'static str,
    },
    /// the operation does not apply to this configuration
    #[error("{0}")]
    Unsupported(String),
    /// the operating system's random number generator failed
    #[error("the system random number generator failed")]
    Rng,
    /// the server thread ended before it was listening
    #[error("the server thread exited during start-up")]
    ThreadExited,
    /// another process (a server, a `restore` or a `rekey`) holds the data
    /// directory's lock
    #[error(
        "the data directory is in use: {path} is locked by {holder}; stop it first (a running \
         server must be stopped for `restore` and `rekey`)"
    )]
    Locked {
        /// the lock file
        path: String,
        /// what the holder wrote into it (process id and command)
        holder: String,
    },
    /// binding the UDP socket failed
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// address
        addr: std::net::SocketAddr,
        /// cause
        source: std::io::Error,
    },
}
