//! Opening SQLCipher databases, shared by the client profile and the server
//! store.
//!
//! New databases authenticate their pages with HMAC-SHA256 instead of
//! SQLCipher 4's default HMAC-SHA512.  Every page written is encrypted and
//! authenticated, and on CPUs with SHA extensions SHA-256 hashes a page
//! much faster than SHA-512 (the figures are on the benchmarks page, which
//! the benchmark suite keeps current).  The tag is 32 bytes under a 256-bit
//! key; the cipher (AES-256
//! in CBC mode) and the passphrase derivation (PBKDF2-HMAC-SHA512, 256 000
//! iterations) stay SQLCipher 4's defaults.
//!
//! A database written before this choice keeps SQLCipher 4's defaults and
//! still opens: [`open_keyed`] tries the current settings first, then the
//! defaults, and reports which one opened the file so that further
//! connections to it use the same.  The settings are not stored anywhere: a
//! page that does not authenticate under one is tried under the other.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

/// The page settings of an encrypted database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherSettings {
    /// HMAC-SHA256 page authentication: what new databases get.
    Current,
    /// SQLCipher 4's defaults (HMAC-SHA512): databases written before.
    Sqlcipher4Defaults,
}

impl CipherSettings {
    fn apply(self, conn: &Connection) -> rusqlite::Result<()> {
        if self == Self::Current {
            conn.pragma_update(None, "cipher_hmac_algorithm", "HMAC_SHA256")?;
        }
        Ok(())
    }
}

/// What opening a database with a key gave.
#[derive(Debug)]
pub enum Opened {
    /// The key opened the database (or created it), with these settings.
    Open(Connection, CipherSettings),
    /// The key opens the database under neither setting: a wrong key, or
    /// not a database.
    WrongKey,
    /// The file is damaged: truncated to a partial page, or some pages fail
    /// authentication under the key while the others pass (so the key is
    /// right).  The text says which.
    Damaged(String),
    /// The SQLite library is not SQLCipher: `PRAGMA key` did nothing.
    NoSqlCipher,
}

/// Opens `path` with `key`, the value given to `PRAGMA key` (a passphrase,
/// or `x'…'` for a raw key), under the current settings and, if the file
/// does not open under them, SQLCipher 4's defaults.
pub fn open_keyed(path: &Path, flags: OpenFlags, key: &str) -> rusqlite::Result<Opened> {
    // SQLite writes whole pages: a partial one means the file was cut
    // short, whatever page 1 says (SQLite would open it and fail later, on
    // whichever read reaches past the end).
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if !len.is_multiple_of(PAGE_SIZE) {
        return Ok(Opened::Damaged(format!(
            "{len} bytes is not a whole number of {PAGE_SIZE}-byte pages: the file is truncated or damaged"
        )));
    }
    for settings in [CipherSettings::Current, CipherSettings::Sqlcipher4Defaults] {
        match open_with(path, flags, key, settings)? {
            Opened::WrongKey => continue,
            other => return Ok(other),
        }
    }
    diagnose(path, flags, key)
}

/// SQLCipher's page size (its default, which quicnprotochat keeps).
const PAGE_SIZE: u64 = 4096;

/// Tells a damaged file from a wrong key, for a file no setting opened:
/// pages that authenticate under the key beside pages that do not mean the
/// key is right and the file damaged (`PRAGMA cipher_integrity_check`
/// checks every page's HMAC).  Anything else reads as a wrong key.
fn diagnose(path: &Path, flags: OpenFlags, key: &str) -> rusqlite::Result<Opened> {
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let pages = len / PAGE_SIZE;
    for settings in [CipherSettings::Current, CipherSettings::Sqlcipher4Defaults] {
        let conn = Connection::open_with_flags(path, flags)?;
        conn.pragma_update(None, "key", key)?;
        conn.pragma_update(None, "cipher_log_level", "NONE")?;
        settings.apply(&conn)?;
        let failed: Vec<u64> = conn
            .prepare("PRAGMA cipher_integrity_check")?
            .query_map([], |r| r.get::<_, String>(0))?
            .filter_map(|row| {
                row.ok()?
                    .strip_prefix("HMAC verification failed for page ")?
                    .parse()
                    .ok()
            })
            .collect();
        let failed_count = u64::try_from(failed.len()).unwrap_or(u64::MAX);
        if !failed.is_empty() && failed_count < pages {
            let shown: Vec<String> = failed.iter().take(5).map(|p| p.to_string()).collect();
            return Ok(Opened::Damaged(format!(
                "{failed_count} of its {pages} pages fail authentication under this key while the others pass (pages {}{}): the key is right and the file is damaged",
                shown.join(", "),
                if failed.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            )));
        }
    }
    Ok(Opened::WrongKey)
}

/// Opens `path` with `key` under the given settings only (a further
/// connection to a database [`open_keyed`] opened).
pub fn open_with(
    path: &Path,
    flags: OpenFlags,
    key: &str,
    settings: CipherSettings,
) -> rusqlite::Result<Opened> {
    let conn = Connection::open_with_flags(path, flags)?;
    conn.pragma_update(None, "key", key)?;
    // SQLCipher prints key failures to stderr by default; callers report
    // them as typed errors.  (Set after `key`: keying installs the defaults.)
    conn.pragma_update(None, "cipher_log_level", "NONE")?;
    settings.apply(&conn)?;
    if !readable(&conn)? {
        return Ok(Opened::WrongKey);
    }
    let version: Option<String> = conn
        .query_row("PRAGMA cipher_version", [], |r| r.get(0))
        .ok();
    if version.unwrap_or_default().is_empty() {
        return Ok(Opened::NoSqlCipher);
    }
    Ok(Opened::Open(conn, settings))
}

/// Reads the schema: `false` when the file is not a database under the
/// connection's key (or lack of one), the first read SQLite decrypts.
pub fn readable(conn: &Connection) -> rusqlite::Result<bool> {
    match conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    }) {
        Ok(_) => Ok(true),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::NotADatabase =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> OpenFlags {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
    }

    /// Writes a database the way SQLCipher 4 does by default.
    fn write_with_defaults(path: &Path, key: &str) {
        let c = Connection::open(path).unwrap();
        c.pragma_update(None, "key", key).unwrap();
        c.execute_batch("CREATE TABLE t (v TEXT); INSERT INTO t VALUES ('kept')")
            .unwrap();
    }

    fn read(c: &Connection) -> String {
        c.query_row("SELECT v FROM t", [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_damaged_file_is_told_from_a_wrong_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = "x'0707070707070707070707070707070707070707070707070707070707070707'";
        let wrong = "x'0808080808080808080808080808080808080808080808080808080808080808'";
        let path = dir.path().join("d.db");
        match open_keyed(&path, flags(), key).unwrap() {
            Opened::Open(c, _) => {
                c.execute_batch("CREATE TABLE t (v BLOB)").unwrap();
                for _ in 0..50 {
                    c.execute("INSERT INTO t VALUES (randomblob(1000))", [])
                        .unwrap();
                }
            }
            other => panic!("{other:?}"),
        }
        let good = std::fs::read(&path).unwrap();
        // A wrong key stays a wrong key.
        assert!(matches!(
            open_keyed(&path, flags(), wrong).unwrap(),
            Opened::WrongKey
        ));
        // The first page damaged: the right key is not called wrong.
        let mut bytes = good.clone();
        bytes[100] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        match open_keyed(&path, flags(), key).unwrap() {
            Opened::Damaged(why) => assert!(why.contains("pages 1)"), "{why}"),
            other => panic!("expected Damaged, got {other:?}"),
        }
        assert!(matches!(
            open_keyed(&path, flags(), wrong).unwrap(),
            Opened::WrongKey
        ));
        // Truncated to a partial page.
        std::fs::write(&path, &good[..good.len() - 1000]).unwrap();
        match open_keyed(&path, flags(), key).unwrap() {
            Opened::Damaged(why) => assert!(why.contains("truncated"), "{why}"),
            other => panic!("expected Damaged, got {other:?}"),
        }
    }

    #[test]
    fn new_databases_get_sha256_pages_and_old_ones_keep_opening() {
        let dir = tempfile::tempdir().unwrap();
        let key = "x'0707070707070707070707070707070707070707070707070707070707070707'";

        let fresh = dir.path().join("new.db");
        match open_keyed(&fresh, flags(), key).unwrap() {
            Opened::Open(c, CipherSettings::Current) => c
                .execute_batch("CREATE TABLE t (v TEXT); INSERT INTO t VALUES ('kept')")
                .unwrap(),
            other => panic!("{other:?}"),
        }
        // Written with HMAC-SHA256: SQLCipher's defaults cannot read it.
        assert!(matches!(
            open_with(&fresh, flags(), key, CipherSettings::Sqlcipher4Defaults).unwrap(),
            Opened::WrongKey
        ));
        match open_keyed(&fresh, flags(), key).unwrap() {
            Opened::Open(c, CipherSettings::Current) => assert_eq!(read(&c), "kept"),
            other => panic!("{other:?}"),
        }

        let old = dir.path().join("old.db");
        write_with_defaults(&old, "a passphrase");
        match open_keyed(&old, flags(), "a passphrase").unwrap() {
            Opened::Open(c, CipherSettings::Sqlcipher4Defaults) => assert_eq!(read(&c), "kept"),
            other => panic!("{other:?}"),
        }

        for (path, wrong) in [(&fresh, "x'08'"), (&old, "another passphrase")] {
            assert!(matches!(
                open_keyed(path, flags(), wrong).unwrap(),
                Opened::WrongKey
            ));
        }
    }
}
