//! The profile database: its file, schema migrations, opening it with its
//! key, and the openmls provider that stores MLS state in it.

use std::fmt;
use std::path::Path;

use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
use openmls_traits::OpenMlsProvider;
use rusqlite::{Connection, OpenFlags};

use super::ProfileKey;
use crate::error::StateError;
use crate::sqlcipher::Opened;

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
    // 4: contacts whose identity key the user verified (safety numbers).
    "CREATE TABLE verified (
        username    TEXT PRIMARY KEY,
        identity    BLOB NOT NULL,
        verified_at INTEGER NOT NULL
     ) WITHOUT ROWID;",
    // 5: how old our own keys are in each group (automatic key updates).
    "CREATE TABLE key_updates (
        group_id   BLOB PRIMARY KEY,
        updated_at INTEGER NOT NULL,
        sent_since INTEGER NOT NULL
     ) WITHOUT ROWID;",
    // 6: delivery tokens members announced to us (presented when we send
    // them messages).
    "CREATE TABLE delivery_tokens (
        identity   BLOB PRIMARY KEY,
        token      BLOB NOT NULL,
        updated_at INTEGER NOT NULL
     ) WITHOUT ROWID;",
    // 7: whether a message was shown to the user.  Messages stored before
    // this count as shown; received ones are stored unshown until the
    // application says it showed them.
    "ALTER TABLE messages ADD COLUMN shown INTEGER NOT NULL DEFAULT 1;
     CREATE INDEX messages_unshown ON messages (id) WHERE shown = 0;",
    // 8: commits of ours not merged or discarded yet (sent again after a
    // restart), messages that could not be processed yet (kept for a retry
    // when their group's epoch changes or the Welcome arrives), and the
    // groups this profile left (whose messages are not worth keeping).
    "CREATE TABLE pending_commits (
        group_id        BLOB PRIMARY KEY,
        commit_id       BLOB,
        commit_to       BLOB,
        commit_payload  BLOB,
        welcome_id      BLOB,
        welcome_to      BLOB,
        welcome_payload BLOB,
        created_at      INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE held (
        id         INTEGER PRIMARY KEY,
        message_id BLOB NOT NULL UNIQUE,
        group_id   BLOB NOT NULL,
        epoch      INTEGER NOT NULL,
        payload    BLOB NOT NULL,
        held_at    INTEGER NOT NULL
     );
     CREATE INDEX held_group ON held (group_id, id);
     CREATE TABLE left_groups (group_id BLOB PRIMARY KEY, left_at INTEGER NOT NULL) WITHOUT ROWID;",
    // 9: the file a message carried (name, type, size, hash, and where it
    // was saved or why not), as JSON; NULL for a text.
    "ALTER TABLE messages ADD COLUMN file TEXT;",
];

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

/// Opens the database at `path` with `key` and sets its pragmas.
pub(super) fn open_db(path: &Path, key: &ProfileKey) -> Result<Connection, StateError> {
    let key = match key {
        ProfileKey::Passphrase(p) => p.clone(),
        ProfileKey::Raw(raw) => format!("x'{}'", hex::encode(raw)),
    };
    let conn = match crate::sqlcipher::open_keyed(path, OpenFlags::default(), &key)? {
        Opened::Open(conn, _) => conn,
        Opened::WrongKey => return Err(StateError::WrongKey),
        Opened::Damaged(detail) => return Err(StateError::Damaged(detail)),
        Opened::NoSqlCipher => return Err(StateError::NoSqlCipher),
    };
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "secure_delete", "ON")?;
    Ok(conn)
}

/// Brings the schema (ours, then openmls's) up to date.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StateError> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let supported = sql_int(MIGRATIONS.len());
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

/// `v` as an SQLite integer (saturating: times and counts never get near).
pub(super) fn sql_int(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}
