//! Errors of the client state.
//!
//! [`StateError`] lives here, below everything that stores state, so the
//! profile ([`crate::profile`]) and the group types ([`crate::group`]) can
//! both use it without importing each other.

use crate::identity::IdentityError;

/// Errors of the client state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// the passphrase or key does not open the profile
    #[error("the passphrase does not open this profile")]
    WrongKey,
    /// the profile's database file is damaged (the passphrase is right)
    #[error("the profile's database is damaged: {0}")]
    Damaged(String),
    /// no profile at that path
    #[error("no profile in {0}")]
    NoProfile(String),
    /// a profile already exists there
    #[error("a profile already exists in {0}")]
    Exists(String),
    /// the SQLite library lacks SQLCipher
    #[error("SQLCipher is not available; refusing to store state unencrypted")]
    NoSqlCipher,
    /// profile written by a newer client
    #[error("profile schema {0} is newer than this client supports")]
    TooNew(i64),
    /// the stored identity is missing or damaged
    #[error("the profile's identity is missing or damaged")]
    Identity,
    /// SQLite failure
    #[error("profile database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// openmls storage failure
    #[error("MLS storage: {0}")]
    Storage(String),
    /// file-system failure
    #[error("profile directory: {0}")]
    Io(#[from] std::io::Error),
    /// identity key failure
    #[error(transparent)]
    Key(#[from] IdentityError),
}

impl StateError {
    /// An openmls storage failure, kept as its text (the storage provider's
    /// error type is generic).
    pub(crate) fn storage(e: impl std::fmt::Display) -> Self {
        Self::Storage(e.to_string())
    }
}
