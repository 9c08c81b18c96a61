//! The messenger's error type: every part returns it, so it sits below them
//! all.

use quicnprotochat_core::file::MAX_FILE_BYTES;
use quicnprotochat_core::{GroupError, StateError};

use crate::error::ClientError;

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
    /// a file to send is not a regular file (a directory, a device, a FIFO)
    #[error("{0} is not a regular file; only regular files can be sent")]
    NotAFile(String),
    /// a file to send is over the limit
    #[error("{path} is {size} bytes; files are limited to 512 KiB ({MAX_FILE_BYTES} bytes)")]
    FileTooLarge {
        /// the file
        path: String,
        /// its size in bytes
        size: u64,
    },
    /// a file to send cannot be read
    #[error("cannot read {path}: {source}")]
    ReadFile {
        /// the file
        path: String,
        /// why
        #[source]
        source: std::io::Error,
    },
}

impl From<quicnprotochat_core::KeyPackageError> for MessengerError {
    fn from(e: quicnprotochat_core::KeyPackageError) -> Self {
        Self::Group(GroupError::KeyPackage(e))
    }
}
