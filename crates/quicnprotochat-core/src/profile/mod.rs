//! Encrypted client state: the profile.
//!
//! A profile is a directory (mode 0700) holding one SQLCipher database,
//! `state.db` (mode 0600).  Everything a client knows lives there, encrypted:
//! the identity key pair, MLS group state and key-package private keys
//! (through openmls's SQLite storage provider on the same keyed connection),
//! settings (server address, pinned fingerprint, access token), the queue
//! cursor, processed message ids, and message history.
//!
//! Every operation that changes MLS state runs in one SQLite transaction:
//! MLS state, history and bookkeeping change together or not at all, so a
//! crash or a rejected input never leaves group state half-updated.  Input
//! from peers that fails validation is a [`GroupError`] and leaves state
//! untouched.  MLS groups stay in memory between operations under the rules
//! in `transaction.rs` (the `PRAGMA data_version` check).
//!
//! Commits follow the delivery service's ordering: an operation that commits
//! returns a [`CommitOutcome`](crate::CommitOutcome) while the commit stays
//! *pending*; the caller sends it and then calls [`Profile::confirm_commit`]
//! (the server accepted it) or [`Profile::abort_commit`] (the server answered
//! `staleEpoch`: another member's commit won; process it, then retry).
//!
//! [`Profile`] is one type; its methods live in submodules by concern:
//!
//! - this module: opening and creating a profile, settings, key packages;
//! - `db.rs`: the database file, schema migrations, the openmls provider;
//! - `storage.rs`: openmls's state in the database (compact values, message
//!   secrets written piece by piece);
//! - `transaction.rs`: write transactions and the group cache;
//! - `groups.rs`: create, invite, remove, self-update, commit proposals,
//!   confirm or abort a commit, leave, send;
//! - `outbox.rs`: messages to send again until the server stored them;
//! - `held.rs`: messages kept until the epoch or Welcome they need arrives;
//! - `pending.rs`: commits of ours not merged or discarded yet;
//! - `peers.rs`: direct-connection addresses of members;
//! - `tokens.rs`: delivery tokens, ours and those members announced;
//! - `history.rs`: stored messages, groups, members, processed message ids;
//! - `process.rs`: incoming messages (saving received files in the download
//!   directory, see [`crate::file`]), joining from a Welcome;
//! - `mls.rs`: small helpers over openmls members and messages.
//!
//! Imports run one way: this module builds on [`crate::group`] (the public
//! data types), [`crate::error`], [`crate::mls_config`] and
//! [`crate::keypackage`], and none of those imports from here.

use crate::clock::SharedClock;
use std::fmt;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::OpenMlsProvider;
use openmls_traits::types::SignatureScheme;
use rusqlite::{Connection, OptionalExtension, params};

use crate::error::StateError;
use crate::group::GroupError;
use crate::identity::{Identity, IdentityKey};

mod db;
mod groups;
mod held;
mod history;
mod keyage;
mod mls;
mod outbox;
mod peers;
mod pending;
mod process;
mod storage;
mod tokens;
mod transaction;
mod verified;

pub use keyage::KeyUpdatePolicy;
pub use verified::{Contact, Verification};

pub use db::{JsonCodec, Provider, STATE_FILE};
use db::{migrate, open_db};
pub use held::{HELD_MAX_AGE_MS, MAX_HELD};
pub use storage::{MlsStorage, StorageError};
use transaction::GroupCache;

/// The secret that opens a profile.
#[derive(Clone)]
pub enum ProfileKey {
    /// A passphrase, stretched by SQLCipher's PBKDF2-HMAC-SHA512 (256 000
    /// iterations) on every open.
    Passphrase(String),
    /// A raw 256-bit key (no stretching; for keys from a keystore).
    Raw([u8; 32]),
}

impl fmt::Debug for ProfileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Passphrase(_) => f.write_str("ProfileKey::Passphrase(<redacted>)"),
            Self::Raw(_) => f.write_str("ProfileKey::Raw(<redacted>)"),
        }
    }
}

/// An open profile.
pub struct Profile {
    conn: Connection,
    identity: Identity,
    username: String,
    /// MLS groups kept in memory between operations (see `transaction.rs`).
    cache: GroupCache,
    dir: PathBuf,
    /// where received files are saved
    downloads: PathBuf,
    /// tells the time of every operation (message times and ids, history,
    /// the processed-id horizon)
    clock: SharedClock,
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Profile")
            .field("dir", &self.dir)
            .field("username", &self.username)
            .field("identity", &self.identity.public_key())
            .finish_non_exhaustive()
    }
}

impl Profile {
    /// Whether `dir` holds a profile.
    pub fn exists(dir: &Path) -> bool {
        dir.join(STATE_FILE).exists()
    }

    /// Creates a profile with a fresh identity for `username`.
    pub fn create(dir: &Path, key: &ProfileKey, username: &str) -> Result<Self, StateError> {
        if Self::exists(dir) {
            return Err(StateError::Exists(dir.display().to_string()));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let path = dir.join(STATE_FILE);
        // Create the file owner-only before SQLite opens it.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let mut conn = open_db(&path, key)?;
        migrate(&mut conn)?;
        let identity = Identity::generate()?;
        {
            let tx = conn.transaction()?;
            identity
                .key_pair()
                .store(Provider::new(&tx).storage())
                .map_err(StateError::storage)?;
            set_setting_on(&tx, "identity", identity.public_key().as_bytes())?;
            set_setting_on(&tx, "username", username.as_bytes())?;
            tx.commit()?;
        }
        Ok(Self {
            conn,
            identity,
            username: username.to_string(),
            cache: GroupCache::default(),
            dir: dir.to_path_buf(),
            downloads: default_downloads(dir),
            clock: crate::clock::system(),
        })
    }

    /// Opens an existing profile.
    pub fn open(dir: &Path, key: &ProfileKey) -> Result<Self, StateError> {
        let path = dir.join(STATE_FILE);
        if !path.exists() {
            return Err(StateError::NoProfile(dir.display().to_string()));
        }
        let mut conn = open_db(&path, key)?;
        migrate(&mut conn)?;
        let public = get_setting_on(&conn, "identity")?.ok_or(StateError::Identity)?;
        let username = get_setting_on(&conn, "username")?
            .and_then(|u| String::from_utf8(u).ok())
            .ok_or(StateError::Identity)?;
        let keys = SignatureKeyPair::read(
            Provider::new(&conn).storage(),
            &public,
            SignatureScheme::ED25519,
        )
        .ok_or(StateError::Identity)?;
        let identity = Identity::from_key_pair(keys)?;
        if identity.public_key().as_bytes() != public.as_slice() {
            return Err(StateError::Identity);
        }
        Ok(Self {
            conn,
            identity,
            username,
            cache: GroupCache::default(),
            dir: dir.to_path_buf(),
            downloads: default_downloads(dir),
            clock: crate::clock::system(),
        })
    }

    /// Deletes this profile: its database files, and its directory when
    /// nothing else is left in it.  For a registration that did not
    /// complete, so that a retry starts clean.
    pub fn discard(self) -> Result<(), StateError> {
        let dir = self.dir.clone();
        // Closes the database before its files go.
        drop(self);
        for suffix in ["", "-wal", "-shm", "-journal"] {
            match std::fs::remove_file(dir.join(format!("{STATE_FILE}{suffix}"))) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StateError::Io(e)),
            }
        }
        // Only an empty directory goes; anything else in it is not ours.
        let _ = std::fs::remove_dir(&dir);
        Ok(())
    }

    /// Tells time by `clock` from now on (the system clock by default):
    /// tests advance a [`crate::clock::ManualClock`] instead of sleeping.
    pub fn set_clock(&mut self, clock: SharedClock) {
        self.clock = clock;
    }

    /// The clock this profile tells time by.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The profile directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where received files are saved: `downloads` in the profile directory
    /// unless [`Profile::set_download_dir`] chose another.  Created (mode
    /// 0700) when the first file arrives.
    pub fn download_dir(&self) -> &Path {
        &self.downloads
    }

    /// Saves received files in `dir` from now on.
    pub fn set_download_dir(&mut self, dir: PathBuf) {
        self.downloads = dir;
    }

    /// This client's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// This client's identity key.
    pub fn identity_key(&self) -> IdentityKey {
        self.identity.public_key()
    }

    /// This client's username.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// Stores a setting (server address, pinned fingerprint, token, ...).
    pub fn set_setting(&self, key: &str, value: &[u8]) -> Result<(), StateError> {
        set_setting_on(&self.conn, key, value)
    }

    /// Reads a setting.
    pub fn setting(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        get_setting_on(&self.conn, key)
    }

    /// The next queue sequence number to fetch.
    pub fn next_seq(&self) -> Result<u64, StateError> {
        next_seq_on(&self.conn)
    }

    /// Generates `count` one-time key packages (and a last-resort one when
    /// `last_resort`), storing their private keys; returns the packages.
    pub fn generate_key_packages(
        &mut self,
        count: usize,
        last_resort: bool,
        lifetime_secs: u64,
    ) -> Result<Vec<Vec<u8>>, GroupError> {
        let tx = self.conn.transaction().map_err(StateError::from)?;
        let provider = Provider::new(&tx);
        let mut out = Vec::with_capacity(count + usize::from(last_resort));
        for i in 0..count + usize::from(last_resort) {
            out.push(crate::keypackage::build(
                &provider,
                &self.identity,
                &self.username,
                i == count,
                lifetime_secs,
            )?);
        }
        tx.commit().map_err(StateError::from)?;
        Ok(out)
    }

    /// Records that queue entries up to `seq` are processed (the cursor).
    pub fn set_next_seq(&self, next: u64) -> Result<(), GroupError> {
        Ok(self.set_setting("next_seq", &next.to_le_bytes())?)
    }
}

/// `downloads` in the profile directory, as an absolute path when the
/// working directory can be read (it is shown to the user).
fn default_downloads(dir: &Path) -> PathBuf {
    let d = dir.join(crate::file::DOWNLOADS_DIR);
    std::path::absolute(&d).unwrap_or(d)
}

fn set_setting_on(conn: &Connection, key: &str, value: &[u8]) -> Result<(), StateError> {
    conn.execute(
        "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

/// The queue cursor as stored on `conn` (1 when none is).
fn next_seq_on(conn: &Connection) -> Result<u64, StateError> {
    Ok(get_setting_on(conn, "next_seq")?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(u64::from_le_bytes)
        .unwrap_or(1))
}

fn get_setting_on(conn: &Connection, key: &str) -> Result<Option<Vec<u8>>, StateError> {
    Ok(conn
        .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
            r.get(0)
        })
        .optional()?)
}
