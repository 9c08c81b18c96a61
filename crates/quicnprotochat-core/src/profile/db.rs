//! The profile database: its file, schema migrations, opening it with its
//! key, and the openmls provider that stores MLS state in it (through
//! [`MlsStorage`]).

use std::fmt;
use std::path::Path;

use openmls::prelude::{GroupId, MlsGroup};
use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
use openmls_traits::OpenMlsProvider;
use rusqlite::{Connection, OpenFlags};

use super::ProfileKey;
use super::storage::MlsStorage;
use crate::error::StateError;
use crate::sqlcipher::Opened;

/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 128;

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

/// Schema 10: MLS state values in the compact encoding and message secrets
/// stores in pieces (see `storage.rs`).  Runs after openmls's migrations
/// (it rewrites their tables), in one transaction with the version bump.
const MLS_STATE_VERSION: i64 = 10;

const MLS_STATE_SQL: &str = "CREATE TABLE mls_message_secrets (
        group_id BLOB NOT NULL,
        chunk    INTEGER NOT NULL,
        bytes    BLOB NOT NULL,
        PRIMARY KEY (group_id, chunk)
     );";

/// JSON codec for openmls's SQLite storage (the crate ships none): the
/// encoding of MLS state up to schema 9, and of its keys still.
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
    storage: MlsStorage<'a>,
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
            storage: MlsStorage::new(conn),
        }
    }
}

impl<'a> OpenMlsProvider for Provider<'a> {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = MlsStorage<'a>;

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
    // Every statement of the profile and of its MLS storage stays prepared
    // (rusqlite keeps 16 by default; an operation uses more than that).
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Brings the schema (ours, then openmls's) up to date.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StateError> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > MLS_STATE_VERSION {
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
    if current < MLS_STATE_VERSION {
        let tx = conn.transaction()?;
        migrate_mls_state(&tx)?;
        tx.pragma_update(None, "user_version", MLS_STATE_VERSION)?;
        tx.commit()?;
    }
    Ok(())
}

/// The migration to schema 10 (in the caller's transaction): the table of
/// message secrets pieces, then every group loaded through storage that
/// writes back compactly what it reads as JSON (openmls reads each part of
/// its group state with its own type), which also moves each message
/// secrets store into pieces.  Other values written as JSON by earlier
/// releases (the identity key pair, unused key packages, HPKE key pairs)
/// are read as they are and written compactly when openmls next writes
/// them.
pub(super) fn migrate_mls_state(tx: &Connection) -> Result<(), StateError> {
    tx.execute_batch(MLS_STATE_SQL)?;
    let ids = tx
        .prepare("SELECT DISTINCT group_id FROM openmls_group_data ORDER BY group_id")?
        .query_map([], |r| r.get::<_, Vec<u8>>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    let storage = MlsStorage::rewriting(tx);
    for id in ids {
        let group_id: GroupId = serde_json::from_slice(&id).map_err(StateError::storage)?;
        MlsGroup::load(&storage, &group_id).map_err(StateError::storage)?;
    }
    Ok(())
}

/// `v` as an SQLite integer (saturating: times and counts never get near).
pub(super) fn sql_int(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::profile::Profile;

    /// A copy of alice's profile of the release fixture (schema 9), its
    /// directory and key.
    fn fixture_alice() -> (tempfile::TempDir, PathBuf, ProfileKey) {
        let dir = tempfile::tempdir().unwrap();
        let profile = dir.path().join("alice");
        std::fs::create_dir(&profile).unwrap();
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/profiles-v9/alice/state.db"),
            profile.join(STATE_FILE),
        )
        .unwrap();
        let key = ProfileKey::Passphrase("fixture-passphrase-alice".into());
        (dir, profile, key)
    }

    fn version(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_migration_that_fails_half_way_leaves_the_profile_as_it_was() {
        let (_dir, profile, key) = fixture_alice();
        let path = profile.join(STATE_FILE);
        // A group whose state does not decode, after alice's group in the
        // migration's order: her group is rewritten, then this one fails.
        let bad: &[u8] = br#"{"value":{"vec":[]}}"#;
        {
            let conn = open_db(&path, &key).unwrap();
            assert_eq!(version(&conn), 9);
            conn.execute(
                "INSERT INTO openmls_group_data (provider_version, group_id, data_type, group_data)
                 VALUES (1, ?1, 'tree', x'00')",
                [bad],
            )
            .unwrap();
        }
        let before = std::fs::read(&path).unwrap();
        assert!(matches!(
            Profile::open(&profile, &key),
            Err(StateError::Storage(_))
        ));

        // Nothing of the migration stayed: schema 9, JSON values, the
        // message secrets in openmls's table, no table of pieces.
        let conn = open_db(&path, &key).unwrap();
        assert_eq!(version(&conn), 9);
        let values: Vec<(String, Vec<u8>)> = conn
            .prepare("SELECT data_type, group_data FROM openmls_group_data WHERE group_id != ?1")
            .unwrap()
            .query_map([bad], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(values.iter().any(|(t, _)| t == "message_secrets"));
        for (data_type, v) in &values {
            assert!(
                serde_json::from_slice::<serde_json::Value>(v).is_ok(),
                "{data_type} not JSON"
            );
        }
        let pieces: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'mls_message_secrets'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(pieces, 0);
        drop(conn);
        assert_eq!(std::fs::read(&path).unwrap(), before);

        // Without the bad group it migrates, and opens again after that.
        let conn = open_db(&path, &key).unwrap();
        conn.execute("DELETE FROM openmls_group_data WHERE group_id = ?1", [bad])
            .unwrap();
        drop(conn);
        let p = Profile::open(&profile, &key).unwrap();
        assert_eq!(version(&p.conn), MLS_STATE_VERSION);
        assert_eq!(p.groups().unwrap().len(), 1);
        drop(p);
        let p = Profile::open(&profile, &key).unwrap();
        assert_eq!(version(&p.conn), MLS_STATE_VERSION);
    }

    #[test]
    fn a_profile_of_a_newer_schema_is_refused() {
        let (_dir, profile, key) = fixture_alice();
        drop(Profile::open(&profile, &key).unwrap());
        let conn = open_db(&profile.join(STATE_FILE), &key).unwrap();
        conn.pragma_update(None, "user_version", MLS_STATE_VERSION + 1)
            .unwrap();
        drop(conn);
        assert!(matches!(
            Profile::open(&profile, &key),
            Err(StateError::TooNew(11))
        ));
    }
}
