//! The `admin` subcommand: what the store holds, for the operator, read
//! (and for `unregister`, written) directly through the configured store,
//! PostgreSQL or the embedded database, while the server runs or not.
//!
//! Nothing shown is secret or content: counts, sizes, ages, usernames and
//! short identity fingerprints (the first 16 hex characters of the
//! identity key); never a payload, a message id or a token.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::config::Config;
use crate::error::ServerError;
use crate::lock::{DataDirLock, LOCK_FILE_NAME, lock_data_dir};
use crate::server::database_key;
use crate::store::postgres::{PgOptions, PgStore};
use crate::store::sqlite::{DB_FILE_NAME, SqliteOptions, SqliteStore};
use crate::store::{KeyPackageStock, QueueInfo, Store, StoreStats, Unregistered};

/// Hex characters of an identity key shown as its fingerprint.
pub const FINGERPRINT_HEX_CHARS: usize = 16;

/// The store an admin command works on, and what keeps it safe to use.
pub struct AdminStore {
    store: Arc<dyn Store>,
    /// held when no server runs on the embedded database: none starts
    /// (nor a `restore` or `rekey`) while the command runs
    _lock: Option<DataDirLock>,
}

impl std::fmt::Debug for AdminStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminStore").finish_non_exhaustive()
    }
}

impl AdminStore {
    /// Opens the configured store.  The embedded database must exist; it is
    /// opened beside a running server (SQLite's locking orders the writes),
    /// but not while a `restore` or `rekey` replaces it.
    pub async fn open(config: &Config) -> Result<Self, ServerError> {
        let Some(url) = &config.database_url else {
            let lock = share_with_server(&config.data_dir)?;
            let path = config.data_dir.join(DB_FILE_NAME);
            if !path.exists() {
                return Err(ServerError::File {
                    what: "the database",
                    path: path.display().to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no database here (check data_dir)",
                    ),
                });
            }
            let mut options = SqliteOptions::new(path, database_key(config)?);
            options.readers = 1;
            options.max_batch = 1;
            options.final_checkpoint = false;
            return Ok(Self {
                store: Arc::new(SqliteStore::open(options)?),
                _lock: lock,
            });
        };
        let mut options = PgOptions::new(url.0.clone());
        options.pool_size = 1;
        options.ca_file = config.database_ca.clone();
        Ok(Self {
            store: Arc::new(PgStore::connect(options).await?),
            _lock: None,
        })
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        &*self.store
    }
}

/// Takes the data directory's lock if it is free (and keeps it while the
/// command runs); if a server holds it, goes on without it; if a `restore`
/// or `rekey` (or anything else) holds it, refuses.
fn share_with_server(dir: &Path) -> Result<Option<DataDirLock>, ServerError> {
    if !dir.join(LOCK_FILE_NAME).exists() && !dir.exists() {
        return Ok(None);
    }
    match lock_data_dir(dir, "admin") {
        Ok(lock) => Ok(Some(lock)),
        Err(ServerError::Locked { holder, .. }) if holder.ends_with("(serve)") => Ok(None),
        Err(e) => Err(e),
    }
}

/// The short fingerprint of an identity key.
pub fn fingerprint(key: &quicnprotochat_core::IdentityKey) -> String {
    let mut hex = hex::encode(key.as_bytes());
    hex.truncate(FINGERPRINT_HEX_CHARS);
    hex
}

/// `admin stats` as JSON.
pub fn stats_json(stats: &StoreStats) -> Result<String, ServerError> {
    to_json(stats)
}

/// `admin stats` as a table.
pub fn stats_table(stats: &StoreStats) -> String {
    let rows = [
        ("identities", stats.identities),
        ("registered usernames", stats.usernames),
        ("non-empty queues", stats.queues),
        ("messages waiting", stats.messages),
        ("payload bytes", stats.payload_bytes),
        ("one-time key packages", stats.key_packages),
        ("last-resort key packages", stats.last_resort_key_packages),
    ];
    rows.iter()
        .map(|(name, n)| format!("{name:<26}{n:>14}\n"))
        .collect()
}

/// One row of `admin queues`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueRow {
    /// short fingerprint of the recipient's identity key
    pub identity: String,
    /// messages waiting
    pub depth: u64,
    /// age of the oldest waiting message, seconds
    pub oldest_age_secs: u64,
}

/// The rows of `admin queues`, ages taken at `now_ms`.
pub fn queue_rows(queues: &[QueueInfo], now_ms: u64) -> Vec<QueueRow> {
    queues
        .iter()
        .map(|q| QueueRow {
            identity: fingerprint(&q.recipient),
            depth: q.depth,
            oldest_age_secs: now_ms.saturating_sub(q.oldest_enqueued_at_ms) / 1000,
        })
        .collect()
}

/// `admin queues` as JSON.
pub fn queues_json(rows: &[QueueRow]) -> Result<String, ServerError> {
    to_json(rows)
}

/// `admin queues` as a table.
pub fn queues_table(rows: &[QueueRow]) -> String {
    let mut out = format!("{:<18}{:>10}  {}\n", "IDENTITY", "DEPTH", "OLDEST");
    for r in rows {
        out.push_str(&format!(
            "{:<18}{:>10}  {}\n",
            r.identity,
            r.depth,
            age(r.oldest_age_secs)
        ));
    }
    if rows.is_empty() {
        out.push_str("(no message is waiting)\n");
    }
    out
}

/// One row of `admin key-packages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StockRow {
    /// short fingerprint of the identity key
    pub identity: String,
    /// its username, if registered
    pub username: Option<String>,
    /// unexpired one-time key packages
    pub one_time: u64,
    /// it has an unexpired last-resort key package
    pub last_resort: bool,
}

/// The rows of `admin key-packages`.
pub fn stock_rows(stock: &[KeyPackageStock]) -> Vec<StockRow> {
    stock
        .iter()
        .map(|s| StockRow {
            identity: fingerprint(&s.identity),
            username: s.username.clone(),
            one_time: s.one_time,
            last_resort: s.last_resort,
        })
        .collect()
}

/// `admin key-packages` as JSON.
pub fn stock_json(rows: &[StockRow]) -> Result<String, ServerError> {
    to_json(rows)
}

/// `admin key-packages` as a table.  Usernames (validated at registration
/// to `[a-z0-9_.-]`) are shown with any other character replaced by `?`.
pub fn stock_table(rows: &[StockRow]) -> String {
    let mut out = format!(
        "{:<18}{:<24}{:>9}  {}\n",
        "IDENTITY", "USERNAME", "ONE-TIME", "LAST-RESORT"
    );
    for r in rows {
        let name = r.username.as_deref().map_or_else(
            || "-".to_string(),
            |u| {
                u.chars()
                    .map(|c| if c.is_ascii_graphic() { c } else { '?' })
                    .collect()
            },
        );
        out.push_str(&format!(
            "{:<18}{:<24}{:>9}  {}\n",
            r.identity,
            name,
            r.one_time,
            if r.last_resort { "yes" } else { "no" }
        ));
    }
    if rows.is_empty() {
        out.push_str("(no registered identity and no key package)\n");
    }
    out
}

/// What `admin unregister` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnregisterReport {
    /// the freed username
    pub username: String,
    /// short fingerprint of the identity it was bound to
    pub identity: String,
    /// key packages removed
    pub key_packages_removed: u64,
}

/// The report of an `admin unregister`.
pub fn unregister_report(username: &str, done: &Unregistered) -> UnregisterReport {
    UnregisterReport {
        username: username.to_string(),
        identity: fingerprint(&done.identity),
        key_packages_removed: done.key_packages,
    }
}

/// `admin unregister` as JSON.
pub fn unregister_json(report: &UnregisterReport) -> Result<String, ServerError> {
    to_json(report)
}

/// `admin unregister` as text.
pub fn unregister_text(report: &UnregisterReport) -> String {
    format!(
        "unregistered {}: identity {}, {} key packages removed; its queue stays for its owner to read\n",
        report.username, report.identity, report.key_packages_removed
    )
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String, ServerError> {
    serde_json::to_string_pretty(value)
        .map(|mut s| {
            s.push('\n');
            s
        })
        .map_err(|e| ServerError::Unsupported(format!("writing JSON: {e}")))
}

/// An age in seconds as `3d 4h`, `5h 6m`, `7m 8s` or `9s`.
fn age(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_fingerprints_read_well() {
        assert_eq!(age(9), "9s");
        assert_eq!(age(7 * 60 + 8), "7m 8s");
        assert_eq!(age(5 * 3600 + 6 * 60 + 7), "5h 6m");
        assert_eq!(age(3 * 86_400 + 4 * 3600), "3d 4h");
        let key = quicnprotochat_core::IdentityKey([0xab; 32]);
        assert_eq!(fingerprint(&key), "abababababababab");
    }
}
