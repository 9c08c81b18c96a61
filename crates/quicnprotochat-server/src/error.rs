//! Errors of the delivery service and their one mapping to the wire.
//!
//! - [`ApiError`] is what a request can fail with.  [`ApiError::write`] is the
//!   only place that turns one into a wire `Error`: a stable code and a safe
//!   message.  Internal details are logged here and never sent.
//! - [`ServerError`] is what start-up can fail with; each names the setting or
//!   file at fault.

use std::time::Duration;

use quicnprotochat_proto::schema::{ErrorCode, error};

use crate::config::ConfigError;
use crate::store::StoreError;

/// A failed request.
#[derive(Debug)]
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
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Self::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Self::Forbidden(_) => ErrorCode::Forbidden,
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::TooLarge(_) => ErrorCode::TooLarge,
            Self::RateLimited { .. } => ErrorCode::RateLimited,
            Self::QueueFull(_) => ErrorCode::QueueFull,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::StaleEpoch(_) => ErrorCode::StaleEpoch,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }

    fn message(&self) -> String {
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

    /// Writes the wire form.  The one place domain errors meet the wire.
    pub(crate) fn write(&self, mut out: error::Builder<'_>, method: &'static str) {
        match self {
            Self::Internal(detail) => tracing::error!(method, %detail, "request failed"),
            other => tracing::debug!(method, code = ?other.code(), "request refused"),
        }
        out.set_code(self.code());
        out.set_message(self.message().as_str());
        if let Self::RateLimited { retry_after } = self {
            out.set_retry_after_ms(
                u32::try_from(retry_after.as_millis())
                    .unwrap_or(u32::MAX)
                    .max(1),
            );
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<capnp::Error> for ApiError {
    fn from(e: capnp::Error) -> Self {
        Self::InvalidArgument(format!("malformed request: {}", e.extra))
    }
}

use quicnprotochat_proto::capnp;

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
    /// binding the UDP socket failed
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// address
        addr: std::net::SocketAddr,
        /// cause
        source: std::io::Error,
    },
}
