//! The data directory's lock: one process at a time may own the embedded
//! database.
//!
//! The server holds an exclusive advisory lock (`flock`) on
//! [`LOCK_FILE_NAME`] in the data directory for its whole life, and so do
//! the maintenance commands that replace the database file (`restore`,
//! `rekey`): a restore or a re-key under a running server would swap the
//! file out from under its open connections.  `backup` and `admin` read (and
//! `admin unregister` writes) through SQLite's own locking and need no lock
//! here.  The operating system releases the lock when its holder exits,
//! however it exits (`kill -9` included), so a stale lock file never blocks
//! anything.

use std::fs::{File, TryLockError};
use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use crate::error::ServerError;

/// The lock file inside the data directory.
pub const LOCK_FILE_NAME: &str = "quicnprotochat.lock";

/// Most bytes of a holder's note read back for an error message.
const MAX_NOTE_BYTES: u64 = 200;

/// A held lock on a data directory; released when dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes the exclusive lock of `dir` for `holder` (`serve`, `restore`,
/// `rekey`), or fails at once with [`ServerError::Locked`] naming the
/// process that holds it.  The lock file records the holder's process id
/// and command, for the error another process shows.
pub fn lock_data_dir(dir: &Path, holder: &str) -> Result<DataDirLock, ServerError> {
    let path = dir.join(LOCK_FILE_NAME);
    let file_error = |source| ServerError::File {
        what: "the data directory's lock file",
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(file_error)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut note = String::new();
            let _ = (&file).take(MAX_NOTE_BYTES).read_to_string(&mut note);
            let note = note.trim();
            return Err(ServerError::Locked {
                path: path.display().to_string(),
                holder: if note.is_empty() {
                    "another process".into()
                } else {
                    note.chars().filter(|c| !c.is_control()).collect()
                },
            });
        }
        Err(TryLockError::Error(e)) => return Err(file_error(e)),
    }
    let note = format!("process {} ({holder})\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(note.as_bytes()))
        .map_err(file_error)?;
    Ok(DataDirLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_data_dir(dir.path(), "serve").unwrap();
        match lock_data_dir(dir.path(), "rekey") {
            Err(ServerError::Locked { holder, .. }) => {
                assert_eq!(holder, format!("process {} (serve)", std::process::id()));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(first);
        let again = lock_data_dir(dir.path(), "rekey").unwrap();
        assert!(again.path().ends_with(LOCK_FILE_NAME));
    }
}
