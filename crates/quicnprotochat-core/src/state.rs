//! Encrypted client state: the profile.
//!
//! A profile is a directory (mode 0700) holding one SQLCipher database,
//! `state.db` (mode 0600).  Everything a client knows lives there, encrypted:
//! the identity key pair, MLS group state and key-package private keys
//! (through openmls's SQLite storage provider on the same keyed connection),
//! settings (server address, pinned fingerprint, access token), the queue
//! cursor, processed message ids, and message history.
//!
//! Every operation that changes MLS state runs in one SQLite transaction, so
//! a crash or a rejected input never leaves group state half-updated.

use std::fmt;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
use openmls_traits::OpenMlsProvider;
use openmls_traits::types::SignatureScheme;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::sqlcipher::Opened;

pub use crate::error::StateError;
use crate::identity::{Identity, IdentityKey};

/// File name of the profile database.
pub const STATE_FILE: &str = "state.db";

/// Application schema migrations (openmls keeps its own tables and migrations).
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value BLOB NOT NULL);
     CREATE TABLE groups (
        group_id   BLOB PRIMARY KEY,
        name       TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
     );
     CREATE TABLE messages (
        id          INTEGER PRIMARY KEY,
        group_id    BLOB NOT NULL,
        message_id  BLOB NOT NULL,
        sender      TEXT NOT NULL,
        sender_key  BLOB NOT NULL,
        sent_at     INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        body        TEXT NOT NULL,
        UNIQUE (group_id, message_id)
     );
     CREATE TABLE processed (message_id BLOB PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID;",
    // 2: peer-to-peer addresses announced by group members.
    "CREATE TABLE peers (
        identity    BLOB PRIMARY KEY,
        endpoint_id BLOB NOT NULL,
        addrs       TEXT NOT NULL,
        relay_url   TEXT,
        updated_at  INTEGER NOT NULL
     ) WITHOUT ROWID;",
    // 3: messages to send again until the server stored them (the Welcomes
    // of confirmed commits).
    "CREATE TABLE outbox (
        message_id BLOB PRIMARY KEY,
        recipients BLOB NOT NULL,
        payload    BLOB NOT NULL,
        created_at INTEGER NOT NULL
     ) WITHOUT ROWID;",
];

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

/// JSON codec for openmls's SQLite storage (the crate ships none).
#[derive(Debug, Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    type Error = serde_json::Error;

    fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
        serde_json::to_vec(value)
    }

    fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
        serde_json::from_slice(slice)
    }
}

/// An openmls provider over a (borrowed) keyed connection.
pub struct Provider<'a> {
    crypto: RustCrypto,
    storage: SqliteStorageProvider<JsonCodec, &'a Connection>,
}

impl fmt::Debug for Provider<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Provider")
    }
}

impl<'a> Provider<'a> {
    /// A provider writing through `conn` (usually a transaction).
    pub fn new(conn: &'a Connection) -> Self {
        Self {
            crypto: RustCrypto::default(),
            storage: SqliteStorageProvider::new(conn),
        }
    }
}

impl<'a> OpenMlsProvider for Provider<'a> {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = SqliteStorageProvider<JsonCodec, &'a Connection>;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        &self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        &self.crypto
    }
}

/// An open profile.
pub struct Profile {
    pub(crate) conn: Connection,
    pub(crate) identity: Identity,
    pub(crate) username: String,
    /// MLS groups kept in memory between operations (see `group.rs`).
    pub(crate) cache: crate::group::GroupCache,
    dir: PathBuf,
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

fn open_db(path: &Path, key: &ProfileKey) -> Result<Connection, StateError> {
    let key = match key {
        ProfileKey::Passphrase(p) => p.clone(),
        ProfileKey::Raw(raw) => format!("x'{}'", hex::encode(raw)),
    };
    let conn = match crate::sqlcipher::open_keyed(path, OpenFlags::default(), &key)? {
        Opened::Open(conn, _) => conn,
        Opened::WrongKey => return Err(StateError::WrongKey),
        Opened::NoSqlCipher => return Err(StateError::NoSqlCipher),
    };
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "secure_delete", "ON")?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StateError> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let supported = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    if current > supported {
        return Err(StateError::TooNew(current));
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(current).unwrap_or(0))
    {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    let mut storage = SqliteStorageProvider::<JsonCodec, &mut Connection>::new(conn);
    storage.run_migrations().map_err(StateError::storage)?;
    Ok(())
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
            cache: crate::group::GroupCache::default(),
            dir: dir.to_path_buf(),
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
            cache: crate::group::GroupCache::default(),
            dir: dir.to_path_buf(),
        })
    }

    /// The profile directory.
    pub fn dir(&self) -> &Path {
        &self.dir
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
        Ok(self
            .setting("next_seq")?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_le_bytes)
            .unwrap_or(1))
    }

    /// Generates `count` one-time key packages (and a last-resort one when
    /// `last_resort`), storing their private keys; returns the packages.
    pub fn generate_key_packages(
        &mut self,
        count: usize,
        last_resort: bool,
        lifetime_secs: u64,
    ) -> Result<Vec<Vec<u8>>, crate::group::GroupError> {
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
}

pub(crate) fn set_setting_on(conn: &Connection, key: &str, value: &[u8]) -> Result<(), StateError> {
    conn.execute(
        "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

pub(crate) fn get_setting_on(conn: &Connection, key: &str) -> Result<Option<Vec<u8>>, StateError> {
    Ok(conn
        .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
            r.get(0)
        })
        .optional()?)
}
