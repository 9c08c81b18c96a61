//! Operator maintenance of the store while no server runs on it, or beside
//! one: the `backup`, `restore` and `rekey` subcommands (operations guide,
//! "Backups and restore", "Re-keying the database").
//!
//! A restore gives the database a new incarnation (protocol section 9.9):
//! clients that see it change read their queues from the start, so what the
//! restored database holds below their cursors is not skipped.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use crate::config::{Config, DbKeySetting, KeyBytes, Mode};
use crate::error::ServerError;
use crate::lock::lock_data_dir;
use crate::server::database_key;
use crate::store::sqlite::{self, DB_FILE_NAME, DbKey, INCARNATION_LEN};

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// the restored database's new incarnation
    pub incarnation: [u8; INCARNATION_LEN],
    /// where the database it replaced was kept, if there was one
    pub replaced: Option<PathBuf>,
}

/// Writes a consistent copy of the configured database to `dest` (a new
/// file), encrypted under the same key; safe while the server runs.
pub fn backup(config: &Config, dest: &Path) -> Result<(), ServerError> {
    embedded_only(config, "backup")?;
    let key = database_key(config)?;
    sqlite::backup(&config.data_dir.join(DB_FILE_NAME), &key, dest)?;
    sync_parent(dest)
}

/// These subcommands work on the embedded database: PostgreSQL has its own
/// tools, which the operations guide names.
fn embedded_only(config: &Config, what: &'static str) -> Result<(), ServerError> {
    if config.database_url.is_some() {
        return Err(ServerError::Unsupported(format!(
            "`{what}` works on the embedded database; the store is PostgreSQL: use its tools \
                 (pg_dump, pg_basebackup with point-in-time recovery), as the operations guide \
                 says under \"Several nodes on PostgreSQL\""
        )));
    }
    Ok(())
}

/// Installs the backup `from` as the configured database, with a new
/// incarnation.  The server must be stopped.  The backup is checked (key,
/// schema, every page) on a copy before anything is replaced; the database
/// it replaces is kept beside it, renamed, with its write-ahead log.
pub fn restore(config: &Config, from: &Path) -> Result<Restored, ServerError> {
    embedded_only(config, "restore")?;
    let dir = &config.data_dir;
    let _lock = lock_data_dir(dir, "restore")?;
    let key = database_key(config)?;
    let live = dir.join(DB_FILE_NAME);
    let staging = dir.join(format!("{DB_FILE_NAME}.restoring"));
    remove_with_logs(&staging)?;
    std::fs::copy(from, &staging).map_err(|source| file_error("the backup", from, source))?;
    private(&staging)?;
    let incarnation = match sqlite::prepare_restore(&staging, &key) {
        Ok(i) => i,
        Err(e) => {
            let _ = remove_with_logs(&staging);
            return Err(e.into());
        }
    };
    remove_logs(&staging)?;
    let replaced = if live.exists() {
        let stamp = config.clock.unix_secs();
        let aside = dir.join(format!("{DB_FILE_NAME}.replaced-{stamp}"));
        rename(&live, &aside)?;
        let wal = log_file(&live, "-wal");
        if wal.exists() {
            rename(&wal, &log_file(&aside, "-wal"))?;
        }
        remove_logs(&live)?;
        Some(aside)
    } else {
        None
    };
    rename(&staging, &live)?;
    sync_parent(&live)?;
    Ok(Restored {
        incarnation,
        replaced,
    })
}

/// What a re-key did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rekeyed {
    /// rows per table, the same before and after
    pub counts: sqlite::TableCounts,
}

/// Re-encrypts the configured database under `new`; the server must be
/// stopped (the data directory's lock says whether it is).
///
/// Crash-safe: a copy under the new key is written beside the database
/// (`quicnprotochat.db.rekeying`), made durable and checked (it opens
/// under the new key, every page authenticates, it holds as many rows per
/// table); only then is the write-ahead log of the database, emptied by a
/// checkpoint under the old key, removed and the copy renamed over the
/// database, and the directory made durable.  Stopped at any instant, the
/// database opens under exactly one of the two keys with all its data:
/// the old one until the rename, the new one after it.
pub fn rekey(config: &Config, new: &KeyBytes) -> Result<Rekeyed, ServerError> {
    embedded_only(config, "rekey")?;
    let dir = &config.data_dir;
    let _lock = lock_data_dir(dir, "rekey")?;
    let old = match &config.db_key {
        DbKeySetting::Provided(k) => k.clone(),
        DbKeySetting::DevGenerated => {
            return Err(ServerError::Unsupported(
                "`rekey` needs the current key configured as db_key (QUICNPROTOCHAT_DB_KEY); a \
                 development database with a generated key is re-keyed by setting db_key to the \
                 content of dev-db.key first"
                    .into(),
            ));
        }
        DbKeySetting::Disabled => {
            return Err(ServerError::Unsupported(
                "`rekey` changes the key of an encrypted database; db_key is empty (no \
                 encryption)"
                    .into(),
            ));
        }
    };
    if &old == new {
        return Err(ServerError::Unsupported(
            "the new key is the current key".into(),
        ));
    }
    if let Some(problem) = crate::production::db_key_problem(new) {
        if config.mode == Mode::Production {
            return Err(ServerError::Production {
                setting: "new_key_file",
                reason: problem.into(),
            });
        }
        tracing::warn!(%problem, "DEVELOPMENT SHORTCUT: the new database key is weak");
    }
    let live = dir.join(DB_FILE_NAME);
    let staging = dir.join(format!("{DB_FILE_NAME}.rekeying"));
    // A copy left by an interrupted re-key is never used: start again.
    remove_with_logs(&staging)?;
    let old_key = DbKey::Raw(old.0);
    let (counts, _) = sqlite::checkpoint(&live, &old_key)?;
    if let Err(e) = sqlite::export_rekeyed(&live, &old.0, &staging, &new.0, &counts) {
        let _ = remove_with_logs(&staging);
        return Err(e.into());
    }
    remove_logs(&staging)?;
    sync_parent(&staging)?;
    // Nothing may have been written since the copy (the lock keeps servers
    // out; this catches anything else): the log must still be empty.
    let (now, frames) = sqlite::checkpoint(&live, &old_key)?;
    if frames != 0 || now != counts {
        let _ = remove_with_logs(&staging);
        return Err(ServerError::Unsupported(
            "the database changed during the re-key: another process writes to it; stop it and \
             run `rekey` again"
                .into(),
        ));
    }
    // The log is empty and belongs to the old file: it must never be
    // applied to the new one.
    remove_logs(&live)?;
    rename(&staging, &live)?;
    sync_parent(&live)?;
    Ok(Rekeyed { counts })
}

/// Reads a key file (standard input for `-`): 64 hexadecimal characters,
/// whitespace around them ignored.  Errors name `setting` and the file,
/// never the content.
pub fn read_key_file(path: &Path, setting: &'static str) -> Result<KeyBytes, ServerError> {
    const MOST_BYTES: u64 = 4096;
    let mut text = String::new();
    let read = if path == Path::new("-") {
        std::io::stdin().take(MOST_BYTES).read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(MOST_BYTES).read_to_string(&mut text))
    };
    read.map_err(|source| file_error("the key file", path, source))?;
    crate::config::parse_db_key(&text).map_err(|_| {
        ServerError::Config(crate::config::ConfigError::Invalid {
            setting,
            reason: format!(
                "{} must hold 64 hexadecimal characters (a raw 256-bit key)",
                path.display()
            ),
        })
    })
}

fn file_error(what: &'static str, path: &Path, source: std::io::Error) -> ServerError {
    ServerError::File {
        what,
        path: path.display().to_string(),
        source,
    }
}

fn log_file(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Removes the write-ahead log and shared-memory files of `db`: a log left
/// beside a replaced file would be applied to the wrong database.
fn remove_logs(db: &Path) -> Result<(), ServerError> {
    for suffix in ["-wal", "-shm"] {
        let path = log_file(db, suffix);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_error("a database log file", &path, e)),
        }
    }
    Ok(())
}

fn remove_with_logs(db: &Path) -> Result<(), ServerError> {
    remove_logs(db)?;
    match std::fs::remove_file(db) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(file_error("a database file", db, e)),
    }
}

fn rename(from: &Path, to: &Path) -> Result<(), ServerError> {
    std::fs::rename(from, to).map_err(|e| file_error("a database file", from, e))
}

/// Readable by the owner only, as the database the server creates.
fn private(path: &Path) -> Result<(), ServerError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| file_error("the restored database", path, e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Makes a rename or a new file in `path`'s directory durable.
fn sync_parent(path: &Path) -> Result<(), ServerError> {
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| file_error("the data directory", dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}
