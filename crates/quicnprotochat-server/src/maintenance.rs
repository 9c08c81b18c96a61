//! Operator maintenance of the store while no server runs on it, or beside
//! one: the `backup` and `restore` subcommands (operations guide, "Backup
//! and restore").
//!
//! A restore gives the database a new incarnation (protocol section 9.9):
//! clients that see it change read their queues from the start, so what the
//! restored database holds below their cursors is not skipped.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::ServerError;
use crate::server::database_key;
use crate::store::sqlite::{self, DB_FILE_NAME, INCARNATION_LEN};

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
    let key = database_key(config)?;
    let dir = &config.data_dir;
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
