//! The embedded default store: SQLite with SQLCipher, one file.
//!
//! # Concurrency design
//!
//! Every message is a write, so writes are the throughput path:
//!
//! - **One writer thread** owns the only write connection.  It takes a job from
//!   its queue, then drains whatever else is waiting (up to
//!   [`SqliteOptions::max_batch`]) and runs the whole batch in one
//!   `BEGIN IMMEDIATE` transaction, each job inside its own `SAVEPOINT` so a
//!   failing job rolls back alone (enqueues excepted: see [`Undo`]).  One
//!   `COMMIT` (one fsync with
//!   `synchronous = FULL`) then makes the whole batch durable, and only after
//!   it does any caller get its answer: group commit.  A single writer also
//!   serialises the read-modify-write steps (sequence numbers, handing each key
//!   package out once) without any lock in our code.
//! - **Reader threads** (WAL mode lets them read while the writer writes) each
//!   own a connection and serve fetches, counts and look-ups, picked round
//!   robin.
//! - The async side only sends boxed jobs over bounded channels and awaits a
//!   oneshot reply; nothing blocks the RPC thread, and a full channel applies
//!   backpressure.
//!
//! There is no `Mutex` in this module, so there is no lock to poison.
//!
//! # Encryption
//!
//! The key is a raw 256-bit key handed to SQLCipher as `x'…'`, which skips
//! SQLCipher's PBKDF2 passphrase derivation (256 000 iterations, hundreds of
//! milliseconds per connection open).  The WAL and shared-memory files are
//! encrypted too.  [`DbKey::Unencrypted`] exists for development only.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use quicnprotochat_core::IdentityKey;
use quicnprotochat_core::sqlcipher::{self, CipherSettings, Opened};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{
    EnqueueOutcome, EnqueueRequest, KeyPackageStock, NewKeyPackage, Presented, PublishOutcome,
    QueueDepth, QueueInfo, QueuedMessage, RegisterOutcome, Store, StoreError, StoreFuture,
    StoreStats, SweepStats, TakenKeyPackage, Unregistered, dedup_key,
};
use crate::metrics::StoreMetrics;

/// File name of the database inside the data directory.
pub const DB_FILE_NAME: &str = "quicnprotochat.db";

/// Default number of reader threads: one per core on the 2-core machines we
/// target, leaving the writer and the RPC thread to share the rest.
pub const DEFAULT_READERS: usize = 2;

/// Default most jobs per writer transaction.  Large enough that one fsync
/// covers a burst of enqueues, small enough that a batch commits within a few
/// milliseconds.
pub const DEFAULT_MAX_BATCH: usize = 256;

/// Depth of each worker's job queue before callers wait (backpressure).
const JOB_QUEUE_DEPTH: usize = 4096;

/// How long SQLite waits on a locked database before failing a statement.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema migrations, applied in order; `PRAGMA user_version` is the number
/// applied so far.  Never edit a released entry: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: users, key packages, queues with shared payloads, idempotency keys.
    "CREATE TABLE users (
        username   TEXT PRIMARY KEY,
        identity   BLOB NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
     );
     CREATE TABLE key_packages (
        id          INTEGER PRIMARY KEY,
        identity    BLOB NOT NULL,
        hash_ref    BLOB NOT NULL UNIQUE,
        data        BLOB NOT NULL,
        last_resort INTEGER NOT NULL,
        not_after   INTEGER NOT NULL
     );
     CREATE INDEX key_packages_by_identity ON key_packages (identity, last_resort, id);
     CREATE TABLE payloads (
        id   INTEGER PRIMARY KEY,
        refs INTEGER NOT NULL,
        data BLOB NOT NULL
     );
     CREATE TABLE queue_heads (
        recipient BLOB PRIMARY KEY,
        next_seq  INTEGER NOT NULL,
        depth     INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE queue (
        recipient   BLOB NOT NULL,
        seq         INTEGER NOT NULL,
        payload_id  INTEGER NOT NULL,
        message_id  BLOB NOT NULL,
        enqueued_at INTEGER NOT NULL,
        PRIMARY KEY (recipient, seq)
     ) WITHOUT ROWID;
     CREATE TABLE dedup (
        key        BLOB PRIMARY KEY,
        expires_at INTEGER NOT NULL
     ) WITHOUT ROWID;",
    // 2: commit ordering, one accepted commit per MLS group epoch.
    "CREATE TABLE group_epochs (
        group_id          BLOB PRIMARY KEY,
        last_commit_epoch INTEGER NOT NULL
     ) WITHOUT ROWID;",
    // 3: idempotency keys led by the message id's time (see `dedup_key`), an
    // index that lets the sweep delete expired keys without reading the
    // others, and until when keys of the old form (no time) may still match.
    "CREATE INDEX dedup_by_expiry ON dedup (expires_at);
     CREATE TABLE meta (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
     ) WITHOUT ROWID;
     INSERT INTO meta (name, value)
        SELECT 'dedup_legacy_until', coalesce(max(expires_at), 0) FROM dedup;",
    // 4: the store's incarnation, a random id made with the database (or
    // with this migration) and changed by a restore from a backup: sequence
    // numbers are comparable only within one incarnation.
    "CREATE TABLE incarnation (
        only INTEGER PRIMARY KEY CHECK (only = 1),
        id   BLOB NOT NULL CHECK (length(id) = 16)
     );
     INSERT INTO incarnation (only, id) VALUES (1, randomblob(16));",
    // 5: delivery tokens (hashes of the current and the previous one per
    // identity), and the stranger lane: a stranger's queued message carries
    // a keyed hash of its sender, and each queue counts them.
    "CREATE TABLE delivery_tokens (
        identity BLOB PRIMARY KEY,
        current  BLOB NOT NULL,
        previous BLOB
     ) WITHOUT ROWID;
     ALTER TABLE queue ADD COLUMN stranger BLOB;
     ALTER TABLE queue_heads ADD COLUMN strangers INTEGER NOT NULL DEFAULT 0;
     CREATE INDEX queue_by_stranger ON queue (recipient, stranger) WHERE stranger IS NOT NULL;",
];

/// Length of a store incarnation.
pub const INCARNATION_LEN: usize = 16;

/// The database key.
#[derive(Clone)]
pub enum DbKey {
    /// A raw 256-bit SQLCipher key.
    Raw([u8; 32]),
    /// No encryption at all (development only; refused in production mode).
    Unencrypted,
}

impl fmt::Debug for DbKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Raw(_) => f.write_str("DbKey::Raw(<redacted>)"),
            Self::Unencrypted => f.write_str("DbKey::Unencrypted"),
        }
    }
}

/// SQLite `synchronous` setting for the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync on every commit: an acknowledged enqueue survives power loss.
    Full,
    /// WAL without fsync on commit: survives a process crash (`kill -9`), not
    /// an OS crash or power loss.
    Normal,
}

/// Options of [`SqliteStore::open`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// database file
    pub path: PathBuf,
    /// encryption key
    pub key: DbKey,
    /// durability of commits
    pub synchronous: Synchronous,
    /// reader threads (at least 1)
    pub readers: usize,
    /// most jobs per writer transaction (at least 1)
    pub max_batch: usize,
    /// where commit times and batch sizes are counted
    pub metrics: StoreMetrics,
    /// fold the write-ahead log into the file when the store closes (the
    /// server does; a tool beside a running server does not, since the
    /// checkpoint would wait on the server's writes)
    pub final_checkpoint: bool,
}

impl SqliteOptions {
    /// Defaults for a database file at `path`.
    pub fn new(path: impl Into<PathBuf>, key: DbKey) -> Self {
        Self {
            path: path.into(),
            key,
            synchronous: Synchronous::Full,
            readers: DEFAULT_READERS,
            max_batch: DEFAULT_MAX_BATCH,
            metrics: StoreMetrics::default(),
            final_checkpoint: true,
        }
    }
}

/// Called once after the batch's COMMIT with its outcome.
type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;
/// Runs a write inside the batch transaction (or is told it cannot run);
/// `Spoiled` when it failed halfway without a savepoint, so that the whole
/// transaction must be rolled back.
type RunWrite = Box<dyn FnOnce(Option<&Connection>) -> (Reply, Spoiled) + Send>;

/// Whether a job left the batch transaction unfit to commit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Spoiled {
    No,
    Yes,
}

/// How a failing job is undone.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Undo {
    /// In a savepoint of its own: a failure rolls back this job alone.
    Savepoint,
    /// Without one (a savepoint copies every page the job touches into its
    /// journal, which the enqueue path cannot afford): a failure rolls back
    /// the whole batch, whose callers all get an error and retry.  Only for
    /// jobs that check everything before they write, so that their only
    /// failures are the store's own (I/O, damage), which SQLite may answer
    /// by rolling the whole transaction back anyway.
    Batch,
}
/// A write job and how it may be batched.
struct WriteJob {
    run: RunWrite,
    /// Runs in a transaction of its own.  Damage met by one job aborts the
    /// whole transaction (SQLite rolls it back), so a job that scans much of
    /// the store (the expiry sweep) must not share the fate of clients'
    /// writes, nor the health probe the fate of anyone else's.
    solo: Solo,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Solo {
    Batched,
    Alone,
}
/// A read job: runs on a reader connection and replies itself.
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// SQLCipher-backed [`Store`].
pub struct SqliteStore {
    writer: Option<mpsc::Sender<WriteJob>>,
    readers: Vec<mpsc::Sender<ReadJob>>,
    next_reader: AtomicUsize,
    threads: Vec<JoinHandle<()>>,
    /// Unix ms until which idempotency keys of the old form may be live.
    legacy_dedup_until: i64,
    /// encrypted with SQLCipher (decides how pages are checked)
    encrypted: bool,
    /// health probes made, the value each writes
    probes: AtomicU64,
    /// the store's incarnation (fixed while it is open: a restore needs
    /// the server stopped)
    incarnation: [u8; INCARNATION_LEN],
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("readers", &self.readers.len())
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) and migrates the database, then starts the
    /// writer and reader threads.  A wrong key is [`StoreError::WrongKey`].
    pub fn open(options: SqliteOptions) -> Result<Self, StoreError> {
        make_private(&options.path)?;
        let (writer_conn, settings) =
            open_connection(&options.path, &options.key, options.synchronous, None)?;
        migrate(&writer_conn)?;
        let legacy_dedup_until: i64 = writer_conn
            .query_row(
                "SELECT value FROM meta WHERE name = 'dedup_legacy_until'",
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let incarnation = read_incarnation(&writer_conn)?;
        let mut threads = Vec::new();
        let (wtx, wrx) = mpsc::channel::<WriteJob>(JOB_QUEUE_DEPTH);
        let max_batch = options.max_batch.max(1);
        let metrics = options.metrics.clone();
        let final_checkpoint = options.final_checkpoint;
        threads.push(
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || {
                    writer_loop(writer_conn, wrx, max_batch, final_checkpoint, &metrics)
                })?,
        );
        let mut readers = Vec::new();
        for i in 0..options.readers.max(1) {
            let (conn, _) =
                open_connection(&options.path, &options.key, options.synchronous, settings)?;
            let (rtx, rrx) = mpsc::channel::<ReadJob>(JOB_QUEUE_DEPTH);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("store-reader-{i}"))
                    .spawn(move || reader_loop(conn, rrx))?,
            );
            readers.push(rtx);
        }
        Ok(Self {
            writer: Some(wtx),
            readers,
            next_reader: AtomicUsize::new(0),
            threads,
            legacy_dedup_until,
            encrypted: matches!(options.key, DbKey::Raw(_)),
            probes: AtomicU64::new(0),
            incarnation,
        })
    }

    /// Stops accepting jobs, lets the writer finish its queue, and joins the
    /// worker threads.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.writer = None;
        self.readers.clear();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a store worker thread panicked");
            }
        }
    }

    fn write<T, F>(&self, op: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.write_as(Solo::Batched, Undo::Savepoint, op)
    }

    /// Like [`Self::write`], in a transaction of its own.
    fn write_alone<T, F>(&self, op: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.write_as(Solo::Alone, Undo::Savepoint, op)
    }

    fn write_as<T, F>(&self, solo: Solo, undo: Undo, op: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, StoreError>>();
        let run: RunWrite = Box::new(move |conn| {
            let result = match (conn, undo) {
                (Some(conn), Undo::Savepoint) => in_savepoint(conn, op),
                (Some(conn), Undo::Batch) => op(conn),
                (None, _) => Err(StoreError::Commit("could not begin a transaction".into())),
            };
            let spoiled = if undo == Undo::Batch && result.is_err() {
                Spoiled::Yes
            } else {
                Spoiled::No
            };
            let reply: Reply = Box::new(move |commit: Result<(), String>| {
                let answer = match commit {
                    Ok(()) => result,
                    Err(e) => Err(StoreError::Commit(e)),
                };
                let _ = tx.send(answer);
            });
            (reply, spoiled)
        });
        let job = WriteJob { run, solo };
        let sender = self.writer.clone();
        Box::pin(async move {
            let sender = sender.ok_or(StoreError::WorkerGone)?;
            sender.send(job).await.map_err(|_| StoreError::WorkerGone)?;
            rx.await.map_err(|_| StoreError::WorkerGone)?
        })
    }

    fn read<T, F>(&self, op: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, StoreError>>();
        let job: ReadJob = Box::new(move |conn| {
            let _ = tx.send(op(conn));
        });
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len().max(1);
        let sender = self.readers.get(i).cloned();
        Box::pin(async move {
            let sender = sender.ok_or(StoreError::WorkerGone)?;
            sender.send(job).await.map_err(|_| StoreError::WorkerGone)?;
            rx.await.map_err(|_| StoreError::WorkerGone)?
        })
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn in_savepoint<T>(
    conn: &Connection,
    op: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.execute_batch("SAVEPOINT job")?;
    let result = op(conn);
    let end = if result.is_ok() {
        "RELEASE job"
    } else {
        "ROLLBACK TO job; RELEASE job"
    };
    conn.execute_batch(end)?;
    result
}

/// One enqueue's statements (see [`Store::enqueue`]), inside the writer's
/// transaction.
fn enqueue_in(
    c: &Connection,
    req: &EnqueueRequest,
    legacy_dedup_until: i64,
) -> Result<EnqueueOutcome, StoreError> {
    let now = to_i64(req.now_ms);
    let key = dedup_key(req);
    let mut live = c.prepare_cached("SELECT 1 FROM dedup WHERE key = ?1 AND expires_at > ?2")?;
    // Keys stored before migration 3 are the bare hash.
    if live.exists(params![key, now])?
        || (now < legacy_dedup_until && live.exists(params![req.dedup_key, now])?)
    {
        return Ok(EnqueueOutcome::Duplicate);
    }
    if let Some((group_id, epoch)) = &req.commit {
        let last: Option<i64> = c
            .prepare_cached("SELECT last_commit_epoch FROM group_epochs WHERE group_id = ?1")?
            .query_row([group_id], |r| r.get(0))
            .optional()?;
        if let Some(last) = last
            && to_u64(last) >= *epoch
        {
            return Ok(EnqueueOutcome::StaleEpoch {
                last_commit_epoch: to_u64(last),
            });
        }
    }
    // One look-up per recipient: registered, its queue head (none yet for
    // an empty queue never written) and its delivery tokens.
    let mut lookup = c.prepare_cached(
        "SELECT h.next_seq, h.depth, h.strangers, t.current, t.previous
         FROM users u
         LEFT JOIN queue_heads h ON h.recipient = u.identity
         LEFT JOIN delivery_tokens t ON t.identity = u.identity
         WHERE u.identity = ?1",
    )?;
    let mut waiting =
        c.prepare_cached("SELECT count(*) FROM queue WHERE recipient = ?1 AND stranger = ?2")?;
    let mut heads = Vec::with_capacity(req.recipients.len());
    for (index, r) in req.recipients.iter().enumerate() {
        type Found = (
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
        );
        let found: Option<Found> = lookup
            .query_row([r.as_bytes()], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            })
            .optional()?;
        let Some((next_seq, depth, strangers, current, previous)) = found else {
            return Ok(EnqueueOutcome::UnknownRecipient { index });
        };
        let (next_seq, depth, strangers) = (
            next_seq.unwrap_or(1),
            depth.unwrap_or(0),
            strangers.unwrap_or(0),
        );
        // A recipient without a delivery token has no stranger lane:
        // every message counts alike (clients of wire version 1).
        let presented = req
            .presented
            .get(index)
            .copied()
            .unwrap_or(Presented::Nothing);
        let stranger = match presented {
            Presented::Own => false,
            Presented::Token(_) | Presented::Nothing => {
                presented.is_stranger(current.as_deref().map(|c| (c, previous.as_deref())))
            }
        };
        if stranger {
            let mine: i64 =
                waiting.query_row(params![r.as_bytes(), &req.sender_tag[..]], |row| row.get(0))?;
            if to_u64(strangers) >= req.stranger_depth || to_u64(mine) >= req.stranger_per_sender {
                return Ok(EnqueueOutcome::QueueFull {
                    index,
                    stranger: true,
                });
            }
        } else if to_u64(depth.saturating_sub(strangers)) >= req.max_depth {
            return Ok(EnqueueOutcome::QueueFull {
                index,
                stranger: false,
            });
        }
        heads.push((next_seq, stranger));
    }
    c.prepare_cached(
        "INSERT INTO dedup (key, expires_at) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at",
    )?
    .execute(params![
        key,
        to_i64(req.now_ms.saturating_add(req.dedup_window_ms))
    ])?;
    if let Some((group_id, epoch)) = &req.commit {
        c.prepare_cached(
            "INSERT INTO group_epochs (group_id, last_commit_epoch) VALUES (?1, ?2)
             ON CONFLICT (group_id) DO UPDATE SET last_commit_epoch = excluded.last_commit_epoch",
        )?
        .execute(params![group_id, to_i64(*epoch)])?;
    }
    let refs = i64::try_from(req.recipients.len()).unwrap_or(i64::MAX);
    c.prepare_cached("INSERT INTO payloads (refs, data) VALUES (?1, ?2)")?
        .execute(params![refs, &req.payload])?;
    let payload_id = c.last_insert_rowid();
    let mut insert = c.prepare_cached(
        "INSERT INTO queue (recipient, seq, payload_id, message_id, enqueued_at, stranger)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut bump = c.prepare_cached(
        "INSERT INTO queue_heads (recipient, next_seq, depth, strangers) VALUES (?1, ?2 + 1, 1, ?3)
         ON CONFLICT (recipient) DO UPDATE SET next_seq = ?2 + 1, depth = depth + 1,
             strangers = strangers + ?3",
    )?;
    let mut seqs = Vec::with_capacity(heads.len());
    for (r, (seq, stranger)) in req.recipients.iter().zip(heads) {
        let tag = stranger.then_some(&req.sender_tag[..]);
        insert.execute(params![
            r.as_bytes(),
            seq,
            payload_id,
            req.message_id,
            now,
            tag
        ])?;
        bump.execute(params![r.as_bytes(), seq, i64::from(stranger)])?;
        seqs.push(to_u64(seq));
    }
    Ok(EnqueueOutcome::Stored { seqs })
}

fn writer_loop(
    conn: Connection,
    mut jobs: mpsc::Receiver<WriteJob>,
    max_batch: usize,
    final_checkpoint: bool,
    metrics: &StoreMetrics,
) {
    let mut batch: Vec<WriteJob> = Vec::with_capacity(max_batch);
    // A job taken from the queue that must wait for the next transaction.
    let mut held: Option<WriteJob> = None;
    loop {
        let Some(first) = held.take().or_else(|| jobs.blocking_recv()) else {
            break;
        };
        let alone = first.solo == Solo::Alone;
        batch.push(first);
        while !alone && batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) if job.solo == Solo::Alone => {
                    held = Some(job);
                    break;
                }
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let jobs_in_batch = batch.len();
        let started = Instant::now();
        let began = conn.execute_batch("BEGIN IMMEDIATE");
        let mut ready = began.is_ok().then_some(&conn);
        let mut spoiled = Spoiled::No;
        let replies: Vec<Reply> = batch
            .drain(..)
            .map(|job| {
                let (reply, s) = (job.run)(ready);
                if s == Spoiled::Yes {
                    // The rest of the batch would be rolled back with it.
                    spoiled = Spoiled::Yes;
                    ready = None;
                }
                reply
            })
            .collect();
        let committing = Instant::now();
        let commit = match (began, spoiled) {
            (Ok(()), Spoiled::No) => conn.execute_batch("COMMIT").map_err(|e| e.to_string()),
            (Ok(()), Spoiled::Yes) => {
                Err("a write failed halfway; the batch was rolled back".to_string())
            }
            (Err(e), _) => Err(e.to_string()),
        };
        if let Err(e) = &commit {
            tracing::error!(error = %e, "store batch failed to commit");
            let _ = conn.execute_batch("ROLLBACK");
        } else {
            metrics.transaction(jobs_in_batch, started.elapsed(), committing.elapsed());
        }
        for reply in replies {
            reply(commit.clone());
        }
    }
    // Stopping: fold the write-ahead log into the database file, so a
    // cleanly stopped store is one file (whichever connection closes last,
    // and whether or not a reader is still busy then).
    if !final_checkpoint {
        return;
    }
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    }) {
        tracing::warn!(error = %e, "final checkpoint of the store failed");
    }
}

fn reader_loop(conn: Connection, mut jobs: mpsc::Receiver<ReadJob>) {
    while let Some(job) = jobs.blocking_recv() {
        job(&conn);
    }
}

/// Makes the database file and its write-ahead log and shared-memory files
/// readable and writable by the server's user only (mode 0600), whatever
/// the umask: the database file is created here, before SQLite opens it,
/// and given mode 0600 explicitly (a umask only narrows a mode at creation);
/// SQLite creates the `-wal` and `-shm` files with the database file's mode.
/// Existing files with any permission for group or others (left by an
/// earlier version, or copied in) are narrowed to 0600.
fn make_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let at = |path: &Path| {
        let path = path.display().to_string();
        move |e: std::io::Error| {
            StoreError::Io(std::io::Error::new(e.kind(), format!("{path}: {e}")))
        }
    };
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(at(path))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(at(path)(e)),
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let file = PathBuf::from(name);
        let Ok(meta) = std::fs::metadata(&file) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                .map_err(at(&file))?;
            tracing::info!(path = %file.display(), was = %format!("{mode:04o}"), "store file narrowed to mode 0600");
        }
    }
    Ok(())
}

/// Opens one connection: key first, key check, then pragmas.  `settings`:
/// those the database is known to use (every connection after the first),
/// or `None` to try the current ones, then SQLCipher 4's defaults.  Returns
/// the settings that opened it (`None` for an unencrypted database).
fn open_connection(
    path: &Path,
    key: &DbKey,
    sync: Synchronous,
    settings: Option<CipherSettings>,
) -> Result<(Connection, Option<CipherSettings>), StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let (conn, settings) = match key {
        DbKey::Raw(raw) => {
            let key = format!("x'{}'", hex::encode(raw));
            let opened = match settings {
                Some(s) => sqlcipher::open_with(path, flags, &key, s)?,
                None => sqlcipher::open_keyed(path, flags, &key)?,
            };
            match opened {
                Opened::Open(conn, s) => (conn, Some(s)),
                Opened::WrongKey => {
                    return Err(StoreError::WrongKey {
                        path: path.display().to_string(),
                    });
                }
                Opened::Damaged(detail) => {
                    return Err(StoreError::Damaged {
                        path: path.display().to_string(),
                        detail,
                    });
                }
                Opened::NoSqlCipher => return Err(StoreError::NoSqlCipher),
            }
        }
        DbKey::Unencrypted => {
            let conn = Connection::open_with_flags(path, flags)?;
            if !sqlcipher::readable(&conn)? {
                return Err(StoreError::WrongKey {
                    path: path.display().to_string(),
                });
            }
            (conn, None)
        }
    };
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
    let sync = match sync {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    // Overwrite deleted content (acknowledged messages, consumed key packages).
    conn.pragma_update(None, "secure_delete", "ON")?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok((conn, settings))
}

/// Reads the store's incarnation.
fn read_incarnation(conn: &Connection) -> Result<[u8; INCARNATION_LEN], StoreError> {
    let id: Vec<u8> = conn.query_row("SELECT id FROM incarnation WHERE only = 1", [], |r| {
        r.get(0)
    })?;
    id.try_into().map_err(|_| StoreError::Damaged {
        path: "incarnation".into(),
        detail: "the store incarnation is not 16 bytes".into(),
    })
}

/// Writes a consistent copy of the database at `path`, as it is at one
/// moment, to `dest` (which must not exist), encrypted under the same key:
/// the backup the operations guide describes.  Safe while a server uses the
/// database: it reads one snapshot and writes nothing to it.
pub fn backup(path: &Path, key: &DbKey, dest: &Path) -> Result<(), StoreError> {
    let missing =
        |what: String| StoreError::Io(std::io::Error::new(std::io::ErrorKind::NotFound, what));
    if !path.exists() {
        return Err(missing(format!("no database at {}", path.display())));
    }
    if dest.exists() {
        return Err(StoreError::Io(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{} already exists; a backup never overwrites a file",
                dest.display()
            ),
        )));
    }
    export(path, key, dest, key)
}

/// Writes a copy of the database at `path` (opened with `key`), as it is
/// at one moment, to the new file `dest`, encrypted under `dest_key` with
/// the source's page settings (SQLCipher's `sqlcipher_export` into an
/// attached database, in one read transaction of the source, with the
/// schema version carried over).  `VACUUM INTO` is not used: it writes
/// SQLCipher's default page settings whatever the source's.
fn export(path: &Path, key: &DbKey, dest: &Path, dest_key: &DbKey) -> Result<(), StoreError> {
    let target = dest.to_str().ok_or_else(|| {
        StoreError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the path {} is not UTF-8", dest.display()),
        ))
    })?;
    let (conn, settings) = open_connection(path, key, Synchronous::Full, None)?;
    let dest_key_text = match dest_key {
        DbKey::Raw(k) => raw_key_text(k),
        DbKey::Unencrypted => String::new(),
    };
    conn.execute(
        "ATTACH DATABASE ?1 AS export KEY ?2",
        params![target, dest_key_text],
    )?;
    let exported = (|| -> Result<(), StoreError> {
        if settings == Some(CipherSettings::Current) && matches!(dest_key, DbKey::Raw(_)) {
            conn.execute_batch("PRAGMA export.cipher_hmac_algorithm = HMAC_SHA256")?;
        }
        conn.execute_batch("BEGIN")?;
        let copied = (|| -> Result<(), StoreError> {
            let version: i64 = conn.query_row("PRAGMA main.user_version", [], |r| r.get(0))?;
            conn.query_row("SELECT sqlcipher_export('export')", [], |_| Ok(()))?;
            conn.execute_batch(&format!("PRAGMA export.user_version = {version}"))?;
            Ok(())
        })();
        match copied {
            Ok(()) => conn.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
        Ok(())
    })();
    let detached = conn.execute_batch("DETACH DATABASE export");
    exported?;
    detached?;
    drop(conn);
    std::fs::File::open(dest)?.sync_all()?;
    Ok(())
}
/// Prepares a backup copy at `path` to replace the live database: opens it
/// with `key` (a wrong key or a damaged copy fails here), brings its schema
/// up to date, checks every page, and gives it a new incarnation, which it
/// returns.  Afterwards `path` is one self-contained file.
pub fn prepare_restore(path: &Path, key: &DbKey) -> Result<[u8; INCARNATION_LEN], StoreError> {
    let (conn, _) = open_connection(path, key, Synchronous::Full, None)?;
    migrate(&conn)?;
    let pragma = if matches!(key, DbKey::Raw(_)) {
        "PRAGMA cipher_integrity_check"
    } else {
        "PRAGMA quick_check"
    };
    let problems: Vec<String> = conn
        .prepare(pragma)?
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<_, _>>()?;
    if let Some(first) = problems.into_iter().find(|p| p != "ok") {
        return Err(StoreError::Damaged {
            path: path.display().to_string(),
            detail: first,
        });
    }
    conn.execute(
        "UPDATE incarnation SET id = randomblob(16) WHERE only = 1",
        [],
    )?;
    let incarnation = read_incarnation(&conn)?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    })?;
    drop(conn);
    Ok(incarnation)
}

/// Rows per table of a database: what a re-key must carry over unchanged.
pub type TableCounts = Vec<(String, i64)>;

fn table_counts(conn: &Connection) -> Result<TableCounts, StoreError> {
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(tables.len());
    for table in tables {
        // The names come from the schema, not from input; quoted anyway.
        let quoted = format!("\"{}\"", table.replace('"', "\"\""));
        let n: i64 = conn.query_row(&format!("SELECT count(*) FROM {quoted}"), [], |r| r.get(0))?;
        out.push((table, n));
    }
    Ok(out)
}

fn raw_key_text(key: &[u8; 32]) -> String {
    format!("x'{}'", hex::encode(key))
}

/// Folds the write-ahead log of the database at `path` into the file and
/// truncates it, under `key`, then closes the database; returns its rows
/// per table and how many log frames the checkpoint found (0: nothing was
/// written since the last checkpoint).  Fails if another connection keeps
/// the log from being emptied.
pub fn checkpoint(path: &Path, key: &DbKey) -> Result<(TableCounts, i64), StoreError> {
    if !path.exists() {
        return Err(StoreError::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no database at {}", path.display()),
        )));
    }
    let (conn, _) = open_connection(path, key, Synchronous::Full, None)?;
    let counts = table_counts(&conn)?;
    let (busy, frames): (i64, i64) =
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    if busy != 0 {
        return Err(StoreError::Io(std::io::Error::new(
            std::io::ErrorKind::ResourceBusy,
            format!(
                "{}: another connection keeps the write-ahead log from being emptied",
                path.display()
            ),
        )));
    }
    drop(conn);
    Ok((counts, frames))
}

/// Writes a copy of the database at `path` (key `old`) to `dest` (which
/// must not exist) encrypted under `new` instead, with the same page
/// settings, then checks it: it opens under `new`, every page
/// authenticates, and it holds as many rows per table as `expected`; and
/// makes it durable.  The source is only read.  Leaves `dest` one
/// self-contained file in write-ahead-log mode.
pub fn export_rekeyed(
    path: &Path,
    old: &[u8; 32],
    dest: &Path,
    new: &[u8; 32],
    expected: &TableCounts,
) -> Result<(), StoreError> {
    if dest.exists() {
        return Err(StoreError::Io(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} already exists", dest.display()),
        )));
    }
    export(path, &DbKey::Raw(*old), dest, &DbKey::Raw(*new))?;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let damaged = |detail: String| StoreError::Damaged {
        path: dest.display().to_string(),
        detail,
    };
    let conn = match sqlcipher::open_keyed(dest, flags, &raw_key_text(new))? {
        Opened::Open(conn, _) => conn,
        Opened::WrongKey => return Err(damaged("the copy does not open under the new key".into())),
        Opened::Damaged(detail) => return Err(damaged(detail)),
        Opened::NoSqlCipher => return Err(StoreError::NoSqlCipher),
    };
    let problems: Vec<String> = conn
        .prepare("PRAGMA cipher_integrity_check")?
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<_, _>>()?;
    if let Some(first) = problems.into_iter().find(|p| p != "ok") {
        return Err(damaged(first));
    }
    let quick: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if quick != "ok" {
        return Err(damaged(quick));
    }
    let counts = table_counts(&conn)?;
    if &counts != expected {
        return Err(damaged(format!(
            "the copy's rows per table {counts:?} differ from the original's {expected:?}"
        )));
    }
    // Back to write-ahead logging, as the server keeps it: the header
    // says so, and the server does not have to change it on start.
    // (The log is empty: closing removes it.)
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
    drop(conn);
    std::fs::File::open(dest)?.sync_all()?;
    Ok(())
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let supported = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    if current > supported {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported,
        });
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(current).unwrap_or(0))
    {
        let version = i + 1;
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {version}; COMMIT;"
        ))
        .inspect_err(|_| {
            let _ = conn.execute_batch("ROLLBACK");
        })?;
        tracing::info!(version, "applied database migration");
    }
    Ok(())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn identity_from_blob(bytes: Vec<u8>) -> Result<IdentityKey, StoreError> {
    IdentityKey::from_slice(&bytes).map_err(|_| {
        StoreError::Sqlite(rusqlite::Error::InvalidColumnType(
            0,
            "identity".into(),
            rusqlite::types::Type::Blob,
        ))
    })
}

impl Store for SqliteStore {
    fn incarnation(&self) -> [u8; 16] {
        self.incarnation
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        let probe = self.probes.fetch_add(1, Ordering::Relaxed);
        let probe = i64::try_from(probe).unwrap_or(i64::MAX);
        let written = self.write_alone(move |c| {
            c.prepare_cached(
                "INSERT INTO meta (name, value) VALUES ('health_probe', ?1)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            )?
            .execute([probe])?;
            Ok(())
        });
        Box::pin(async move {
            written.await?;
            self.read(|c| {
                c.query_row(
                    "SELECT value FROM meta WHERE name = 'health_probe'",
                    [],
                    |r| r.get::<_, i64>(0),
                )?;
                Ok(())
            })
            .await
        })
    }

    fn integrity_check(&self) -> StoreFuture<'_, Option<String>> {
        let encrypted = self.encrypted;
        self.read(move |c| {
            // SQLCipher checks each page's HMAC; plain SQLite its b-trees.
            let pragma = if encrypted {
                "PRAGMA cipher_integrity_check"
            } else {
                "PRAGMA quick_check"
            };
            let problems: Vec<String> = c
                .prepare(pragma)?
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<_, _>>()?;
            let problems: Vec<String> = problems.into_iter().filter(|p| p != "ok").collect();
            Ok((!problems.is_empty()).then(|| {
                let shown = problems
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ");
                if problems.len() > 3 {
                    format!("{} problems: {shown}; …", problems.len())
                } else {
                    shown
                }
            }))
        })
    }

    fn register(
        &self,
        username: String,
        identity: IdentityKey,
    ) -> StoreFuture<'_, RegisterOutcome> {
        self.write(move |c| {
            let owner: Option<Vec<u8>> = c
                .prepare_cached("SELECT identity FROM users WHERE username = ?1")?
                .query_row([&username], |r| r.get(0))
                .optional()?;
            if let Some(owner) = owner {
                return Ok(if owner == identity.as_bytes() {
                    RegisterOutcome::AlreadyRegistered
                } else {
                    RegisterOutcome::UsernameTaken
                });
            }
            let taken: Option<String> = c
                .prepare_cached("SELECT username FROM users WHERE identity = ?1")?
                .query_row([identity.as_bytes()], |r| r.get(0))
                .optional()?;
            if taken.is_some() {
                return Ok(RegisterOutcome::IdentityTaken);
            }
            c.prepare_cached(
                "INSERT INTO users (username, identity, created_at) VALUES (?1, ?2, unixepoch())",
            )?
            .execute(params![username, identity.as_bytes()])?;
            Ok(RegisterOutcome::Registered)
        })
    }

    fn resolve(&self, username: String) -> StoreFuture<'_, Option<IdentityKey>> {
        self.read(move |c| {
            let found: Option<Vec<u8>> = c
                .prepare_cached("SELECT identity FROM users WHERE username = ?1")?
                .query_row([&username], |r| r.get(0))
                .optional()?;
            found.map(identity_from_blob).transpose()
        })
    }

    fn publish_key_packages(
        &self,
        identity: IdentityKey,
        packages: Vec<NewKeyPackage>,
        max_per_identity: u32,
    ) -> StoreFuture<'_, PublishOutcome> {
        self.write(move |c| {
            let have: i64 = c
                .prepare_cached(
                    "SELECT count(*) FROM key_packages WHERE identity = ?1 AND last_resort = 0",
                )?
                .query_row([identity.as_bytes()], |r| r.get(0))?;
            let mut exists = c.prepare_cached("SELECT 1 FROM key_packages WHERE hash_ref = ?1")?;
            let mut fresh_one_time = 0_i64;
            for p in packages.iter().filter(|p| !p.last_resort) {
                if !exists.exists([&p.hash_ref])? {
                    fresh_one_time += 1;
                }
            }
            if have + fresh_one_time > i64::from(max_per_identity) {
                return Ok(PublishOutcome::OverCap { have: u32::try_from(have).unwrap_or(u32::MAX) });
            }
            let mut insert = c.prepare_cached(
                "INSERT OR IGNORE INTO key_packages (identity, hash_ref, data, last_resort, not_after)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut stored = 0_u32;
            for p in &packages {
                if p.last_resort {
                    c.prepare_cached(
                        "DELETE FROM key_packages WHERE identity = ?1 AND last_resort = 1",
                    )?
                    .execute([identity.as_bytes()])?;
                }
                let n = insert.execute(params![
                    identity.as_bytes(),
                    p.hash_ref,
                    p.data,
                    p.last_resort,
                    to_i64(p.not_after)
                ])?;
                stored += u32::try_from(n).unwrap_or(0);
            }
            Ok(PublishOutcome::Stored(stored))
        })
    }

    fn take_key_package(
        &self,
        identity: IdentityKey,
        now_secs: u64,
    ) -> StoreFuture<'_, Option<TakenKeyPackage>> {
        self.write(move |c| {
            let one_time: Option<Vec<u8>> = c
                .prepare_cached(
                    "DELETE FROM key_packages WHERE id = (
                        SELECT id FROM key_packages
                        WHERE identity = ?1 AND last_resort = 0 AND not_after > ?2
                        ORDER BY id LIMIT 1)
                     RETURNING data",
                )?
                .query_row(params![identity.as_bytes(), to_i64(now_secs)], |r| r.get(0))
                .optional()?;
            if let Some(data) = one_time {
                return Ok(Some(TakenKeyPackage {
                    data,
                    last_resort: false,
                }));
            }
            let last_resort: Option<Vec<u8>> = c
                .prepare_cached(
                    "SELECT data FROM key_packages
                     WHERE identity = ?1 AND last_resort = 1 AND not_after > ?2
                     ORDER BY id DESC LIMIT 1",
                )?
                .query_row(params![identity.as_bytes(), to_i64(now_secs)], |r| r.get(0))
                .optional()?;
            Ok(last_resort.map(|data| TakenKeyPackage {
                data,
                last_resort: true,
            }))
        })
    }

    fn key_package_count(
        &self,
        identity: IdentityKey,
        now_secs: u64,
    ) -> StoreFuture<'_, (u32, bool)> {
        self.read(move |c| {
            let (one_time, last_resort): (i64, i64) = c
                .prepare_cached(
                    "SELECT coalesce(sum(last_resort = 0), 0), coalesce(sum(last_resort = 1), 0)
                     FROM key_packages WHERE identity = ?1 AND not_after > ?2",
                )?
                .query_row(params![identity.as_bytes(), to_i64(now_secs)], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            Ok((u32::try_from(one_time).unwrap_or(u32::MAX), last_resort > 0))
        })
    }

    fn enqueue(&self, req: EnqueueRequest) -> StoreFuture<'_, EnqueueOutcome> {
        let legacy_dedup_until = self.legacy_dedup_until;
        self.write_as(Solo::Batched, Undo::Batch, move |c| {
            enqueue_in(c, &req, legacy_dedup_until)
        })
    }

    fn enqueue_batch(
        &self,
        requests: Vec<EnqueueRequest>,
    ) -> StoreFuture<'_, Vec<Result<EnqueueOutcome, StoreError>>> {
        // One job in the writer's transaction, made durable by its one
        // COMMIT.  Each enqueue checks everything before it writes, so a
        // refusal leaves nothing to undo and needs no savepoint; a failure
        // of the store itself rolls the whole batch back (see `Undo`).
        let legacy_dedup_until = self.legacy_dedup_until;
        self.write_as(Solo::Batched, Undo::Batch, move |c| {
            requests
                .iter()
                .map(|req| enqueue_in(c, req, legacy_dedup_until).map(Ok))
                .collect()
        })
    }

    fn fetch(
        &self,
        recipient: IdentityKey,
        from_seq: u64,
        limit: u32,
        max_bytes: usize,
    ) -> StoreFuture<'_, Vec<QueuedMessage>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT q.seq, q.message_id, q.enqueued_at, p.data
                 FROM queue q JOIN payloads p ON p.id = q.payload_id
                 WHERE q.recipient = ?1 AND q.seq >= ?2
                 ORDER BY q.seq LIMIT ?3",
            )?;
            let mut rows = stmt.query(params![recipient.as_bytes(), to_i64(from_seq), limit])?;
            let mut out = Vec::new();
            let mut bytes = 0_usize;
            while let Some(row) = rows.next()? {
                let payload: Vec<u8> = row.get(3)?;
                bytes += payload.len();
                out.push(QueuedMessage {
                    seq: to_u64(row.get(0)?),
                    message_id: row.get(1)?,
                    enqueued_at_ms: to_u64(row.get(2)?),
                    payload,
                });
                if bytes >= max_bytes {
                    break;
                }
            }
            Ok(out)
        })
    }

    fn ack(&self, recipient: IdentityKey, up_to: u64) -> StoreFuture<'_, u32> {
        self.write(move |c| {
            let removed_rows: Vec<(i64, bool)> = c
                .prepare_cached(
                    "DELETE FROM queue WHERE recipient = ?1 AND seq <= ?2
                     RETURNING payload_id, stranger IS NOT NULL",
                )?
                .query_map(params![recipient.as_bytes(), to_i64(up_to)], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?
                .collect::<Result<_, _>>()?;
            if removed_rows.is_empty() {
                return Ok(0);
            }
            let strangers =
                i64::try_from(removed_rows.iter().filter(|(_, s)| *s).count()).unwrap_or(i64::MAX);
            let payload_ids: Vec<i64> = removed_rows.into_iter().map(|(id, _)| id).collect();
            let mut release =
                c.prepare_cached("UPDATE payloads SET refs = refs - 1 WHERE id = ?1")?;
            let mut drop_unused =
                c.prepare_cached("DELETE FROM payloads WHERE id = ?1 AND refs <= 0")?;
            for id in &payload_ids {
                release.execute([id])?;
                drop_unused.execute([id])?;
            }
            let removed = i64::try_from(payload_ids.len()).unwrap_or(i64::MAX);
            c.prepare_cached(
                "UPDATE queue_heads SET depth = max(depth - ?2, 0), strangers = max(strangers - ?3, 0)
                 WHERE recipient = ?1",
            )?
            .execute(params![recipient.as_bytes(), removed, strangers])?;
            Ok(u32::try_from(removed).unwrap_or(u32::MAX))
        })
    }

    fn set_delivery_token(
        &self,
        identity: IdentityKey,
        token_hash: [u8; 32],
    ) -> StoreFuture<'_, ()> {
        self.write(move |c| {
            // Every right-hand side reads the row as it was.
            c.prepare_cached(
                "INSERT INTO delivery_tokens (identity, current, previous) VALUES (?1, ?2, NULL)
                 ON CONFLICT (identity) DO UPDATE SET
                     previous = CASE WHEN current = excluded.current THEN previous ELSE current END,
                     current = excluded.current",
            )?
            .execute(params![identity.as_bytes(), &token_hash[..]])?;
            Ok(())
        })
    }

    fn sweep(&self, now_secs: u64, now_ms: u64) -> StoreFuture<'_, SweepStats> {
        self.write_alone(move |c| {
            let key_packages = c
                .prepare_cached("DELETE FROM key_packages WHERE not_after <= ?1")?
                .execute([to_i64(now_secs)])?;
            let dedup_keys = c
                .prepare_cached("DELETE FROM dedup WHERE expires_at <= ?1")?
                .execute([to_i64(now_ms)])?;
            Ok(SweepStats {
                key_packages: u64::try_from(key_packages).unwrap_or(0),
                dedup_keys: u64::try_from(dedup_keys).unwrap_or(0),
            })
        })
    }

    fn queue_depth(&self) -> StoreFuture<'_, QueueDepth> {
        self.read(|c| {
            let (messages, largest): (i64, i64) = c
                .prepare_cached(
                    "SELECT coalesce(sum(depth), 0), coalesce(max(depth), 0)
                     FROM queue_heads",
                )?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(QueueDepth {
                messages: to_u64(messages),
                largest: to_u64(largest),
            })
        })
    }

    fn stats(&self, now_secs: u64) -> StoreFuture<'_, StoreStats> {
        self.read(move |c| {
            let now = to_i64(now_secs);
            let count = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> Result<u64, StoreError> {
                Ok(to_u64(c.query_row(sql, p, |r| r.get::<_, i64>(0))?))
            };
            // One read transaction: the totals agree with each other.
            c.execute_batch("BEGIN")?;
            let stats = (|| {
                let (queues, messages): (i64, i64) = c.query_row(
                    "SELECT count(DISTINCT recipient), count(*) FROM queue",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                Ok(StoreStats {
                    identities: count(
                        "SELECT count(*) FROM (
                            SELECT identity FROM users
                            UNION SELECT identity FROM key_packages
                            UNION SELECT recipient FROM queue
                            UNION SELECT identity FROM delivery_tokens)",
                        &[],
                    )?,
                    usernames: count("SELECT count(*) FROM users", &[])?,
                    queues: to_u64(queues),
                    messages: to_u64(messages),
                    payload_bytes: count(
                        "SELECT coalesce(sum(length(data)), 0) FROM payloads",
                        &[],
                    )?,
                    key_packages: count(
                        "SELECT count(*) FROM key_packages WHERE last_resort = 0 AND not_after > ?1",
                        &[&now],
                    )?,
                    last_resort_key_packages: count(
                        "SELECT count(DISTINCT identity) FROM key_packages
                         WHERE last_resort = 1 AND not_after > ?1",
                        &[&now],
                    )?,
                })
            })();
            c.execute_batch("COMMIT")?;
            stats
        })
    }

    fn largest_queues(&self, limit: u32) -> StoreFuture<'_, Vec<QueueInfo>> {
        self.read(move |c| {
            c.prepare(
                "SELECT recipient, count(*) AS depth, min(enqueued_at) FROM queue
                 GROUP BY recipient ORDER BY depth DESC, recipient LIMIT ?1",
            )?
            .query_map([limit], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?
            .map(|row| {
                let (recipient, depth, oldest) = row?;
                Ok(QueueInfo {
                    recipient: identity_from_blob(recipient)?,
                    depth: to_u64(depth),
                    oldest_enqueued_at_ms: to_u64(oldest),
                })
            })
            .collect()
        })
    }

    fn key_package_stock(
        &self,
        now_secs: u64,
        limit: u32,
    ) -> StoreFuture<'_, Vec<KeyPackageStock>> {
        self.read(move |c| {
            c.prepare(
                "SELECT i.identity, u.username,
                    (SELECT count(*) FROM key_packages k
                     WHERE k.identity = i.identity AND k.last_resort = 0 AND k.not_after > ?1)
                        AS one_time,
                    EXISTS (SELECT 1 FROM key_packages k
                     WHERE k.identity = i.identity AND k.last_resort = 1 AND k.not_after > ?1)
                 FROM (SELECT identity FROM users UNION SELECT identity FROM key_packages) i
                 LEFT JOIN users u ON u.identity = i.identity
                 ORDER BY one_time, u.username IS NULL, u.username, i.identity
                 LIMIT ?2",
            )?
            .query_map(params![to_i64(now_secs), limit], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, bool>(3)?,
                ))
            })?
            .map(|row| {
                let (identity, username, one_time, last_resort) = row?;
                Ok(KeyPackageStock {
                    identity: identity_from_blob(identity)?,
                    username,
                    one_time: to_u64(one_time),
                    last_resort,
                })
            })
            .collect()
        })
    }

    fn unregister(&self, username: String) -> StoreFuture<'_, Option<Unregistered>> {
        self.write(move |c| {
            let identity: Option<Vec<u8>> = c
                .prepare_cached("DELETE FROM users WHERE username = ?1 RETURNING identity")?
                .query_row([&username], |r| r.get(0))
                .optional()?;
            let Some(identity) = identity else {
                return Ok(None);
            };
            let key_packages = c
                .prepare_cached("DELETE FROM key_packages WHERE identity = ?1")?
                .execute([&identity])?;
            Ok(Some(Unregistered {
                identity: identity_from_blob(identity)?,
                key_packages: u64::try_from(key_packages).unwrap_or(u64::MAX),
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> IdentityKey {
        IdentityKey([b; 32])
    }

    fn open(dir: &Path, k: DbKey) -> Result<SqliteStore, StoreError> {
        SqliteStore::open(SqliteOptions::new(dir.join(DB_FILE_NAME), k))
    }

    fn enqueue_req(
        recipients: &[IdentityKey],
        id: u8,
        payload: &[u8],
        depth: u64,
    ) -> EnqueueRequest {
        EnqueueRequest {
            recipients: recipients.to_vec(),
            message_id: [id; 16],
            dedup_key: [id; 32],
            payload: payload.to_vec(),
            now_ms: 1_000,
            max_depth: depth,
            dedup_window_ms: 60_000,
            commit: None,
            presented: vec![Presented::Nothing; recipients.len()],
            sender_tag: [id; 16],
            stranger_depth: 1_000,
            stranger_per_sender: 100,
        }
    }

    #[tokio::test]
    async fn a_batch_stores_each_request_in_order_and_a_failure_halfway_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db_key = DbKey::Raw([7; 32]);
        let s = open(dir.path(), db_key.clone()).unwrap();
        register_all(&s, &[1, 2]).await;
        // Refusals in between store nothing and keep the order of the rest.
        let outcomes = s
            .enqueue_batch(vec![
                enqueue_req(&[key(1)], 1, b"a", 10),
                enqueue_req(&[key(1), key(9)], 2, b"to nobody", 10),
                enqueue_req(&[key(1)], 1, b"a again", 10),
                enqueue_req(&[key(1), key(2)], 3, b"b", 10),
            ])
            .await
            .unwrap();
        let outcomes: Vec<EnqueueOutcome> = outcomes.into_iter().map(|o| o.unwrap()).collect();
        assert_eq!(
            outcomes,
            [
                EnqueueOutcome::Stored { seqs: vec![1] },
                EnqueueOutcome::UnknownRecipient { index: 1 },
                EnqueueOutcome::Duplicate,
                EnqueueOutcome::Stored { seqs: vec![2, 1] },
            ]
        );
        // A write that fails after others of the same enqueue (a trigger
        // stands in for an I/O error): the whole batch is rolled back,
        // every caller hears of it, and nothing half-written remains.
        let (raw, _) = open_connection(
            &dir.path().join(DB_FILE_NAME),
            &db_key,
            Synchronous::Full,
            None,
        )
        .unwrap();
        raw.execute_batch(&format!(
            "CREATE TRIGGER fail_for_two BEFORE INSERT ON queue WHEN NEW.recipient = x'{}'
             BEGIN SELECT RAISE(ABORT, 'injected'); END;",
            hex::encode(key(2).as_bytes())
        ))
        .unwrap();
        let count = |table: &str| -> i64 {
            raw.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        };
        let before: Vec<i64> = ["queue", "payloads", "dedup", "queue_heads"]
            .iter()
            .map(|t| count(t))
            .collect();
        let (alone, batch) = tokio::join!(
            s.enqueue(enqueue_req(&[key(1)], 4, b"c", 10)),
            s.enqueue_batch(vec![
                enqueue_req(&[key(1)], 5, b"d", 10),
                enqueue_req(&[key(1), key(2)], 6, b"e", 10),
            ])
        );
        assert!(batch.is_err(), "{batch:?}");
        let after: Vec<i64> = ["queue", "payloads", "dedup", "queue_heads"]
            .iter()
            .map(|t| count(t))
            .collect();
        // The lone enqueue either shared the failed transaction (and failed
        // too) or ran in one of its own.
        let extra = i64::from(alone.is_ok());
        assert_eq!(
            after,
            [
                before[0] + extra,
                before[1] + extra,
                before[2] + extra,
                before[3]
            ]
        );
        raw.execute_batch("DROP TRIGGER fail_for_two").unwrap();
        // Retried, everything is stored once, in order.
        for (id, payload) in [(4u8, &b"c"[..]), (5, b"d"), (6, b"e")] {
            s.enqueue(enqueue_req(
                &[key(1), key(2)][..if id == 6 { 2 } else { 1 }],
                id,
                payload,
                10,
            ))
            .await
            .unwrap();
        }
        let got = s.fetch(key(1), 1, 100, usize::MAX).await.unwrap();
        assert_eq!(
            got.iter().map(|m| m.payload.as_slice()).collect::<Vec<_>>(),
            [&b"a"[..], b"b", b"c", b"d", b"e"]
        );
        assert_eq!(
            got.iter().map(|m| m.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
    }

    #[tokio::test]
    async fn a_cleanly_closed_store_is_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), DbKey::Raw([7; 32])).unwrap();
        s.register("alice".into(), key(1)).await.unwrap();
        for i in 0..50u8 {
            s.enqueue(enqueue_req(&[key(1)], i, &[i; 2000], 1_000))
                .await
                .unwrap();
        }
        // A reader busy at the moment of closing does not keep the log.
        let busy = s.integrity_check();
        let (r, ()) = tokio::join!(busy, async { tokio::task::yield_now().await });
        assert_eq!(r.unwrap(), None);
        s.close();
        let wal = dir.path().join(format!("{DB_FILE_NAME}-wal"));
        assert!(
            std::fs::metadata(&wal)
                .map(|m| m.len() == 0)
                .unwrap_or(true),
            "the write-ahead log still holds frames after a clean close"
        );
    }

    #[tokio::test]
    async fn a_backup_restores_with_its_data_and_a_new_incarnation() {
        let dir = tempfile::tempdir().unwrap();
        let db_key = DbKey::Raw([7; 32]);
        let s = open(dir.path(), db_key.clone()).unwrap();
        let first = s.incarnation();
        register_all(&s, &[1]).await;
        s.enqueue(enqueue_req(&[key(1)], 1, b"kept", 10))
            .await
            .unwrap();
        let live = dir.path().join(DB_FILE_NAME);
        let copy = dir.path().join("backup.db");
        // Taken while the store is open and serving.
        backup(&live, &db_key, &copy).unwrap();
        assert!(
            backup(&live, &db_key, &copy).is_err(),
            "a backup never overwrites a file"
        );
        s.enqueue(enqueue_req(&[key(1)], 2, b"after", 10))
            .await
            .unwrap();
        s.close();
        // The copy keeps the database's page settings (HMAC-SHA256) and
        // schema version.
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY;
        match sqlcipher::open_with(
            &copy,
            flags,
            &raw_key_text(&[7; 32]),
            CipherSettings::Current,
        )
        .unwrap()
        {
            Opened::Open(c, CipherSettings::Current) => {
                let version: i64 = c
                    .query_row("PRAGMA user_version", [], |r| r.get(0))
                    .unwrap();
                assert_eq!(version, i64::try_from(MIGRATIONS.len()).unwrap());
            }
            other => panic!("the backup has other page settings: {other:?}"),
        }
        // The copy opens by itself under the same key, with the same
        // incarnation until a restore prepares it.
        let b = open_path(&copy, db_key.clone()).unwrap();
        assert_eq!(b.incarnation(), first);
        b.close();
        assert!(matches!(
            prepare_restore(&copy, &DbKey::Raw([8; 32])),
            Err(StoreError::WrongKey { .. })
        ));
        let restored = prepare_restore(&copy, &db_key).unwrap();
        assert_ne!(restored, first);
        let b = open_path(&copy, db_key).unwrap();
        assert_eq!(b.incarnation(), restored);
        let got = b.fetch(key(1), 1, 10, 1 << 20).await.unwrap();
        assert_eq!(
            got.iter().map(|m| m.payload.as_slice()).collect::<Vec<_>>(),
            [b"kept".as_slice()]
        );
    }

    #[tokio::test]
    async fn a_rekeyed_copy_opens_only_under_the_new_key_with_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), DbKey::Raw([7; 32])).unwrap();
        register_all(&s, &[1, 2]).await;
        for i in 0..20u8 {
            s.enqueue(enqueue_req(&[key(1), key(2)], i, &[i; 300], 100))
                .await
                .unwrap();
        }
        s.close();
        let live = dir.path().join(DB_FILE_NAME);
        let (counts, _) = checkpoint(&live, &DbKey::Raw([7; 32])).unwrap();
        let copy = dir.path().join("rekeyed.db");
        export_rekeyed(&live, &[7; 32], &copy, &[9; 32], &counts).unwrap();
        assert!(matches!(
            open_path(&copy, DbKey::Raw([7; 32])),
            Err(StoreError::WrongKey { .. })
        ));
        // The page settings are kept (HMAC-SHA256, what new databases get).
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE;
        assert!(matches!(
            sqlcipher::open_with(
                &copy,
                flags,
                &raw_key_text(&[9; 32]),
                CipherSettings::Current
            )
            .unwrap(),
            Opened::Open(_, CipherSettings::Current)
        ));
        let b = open_path(&copy, DbKey::Raw([9; 32])).unwrap();
        assert_eq!(b.fetch(key(2), 0, 100, 1 << 20).await.unwrap().len(), 20);
        let mut wrong = counts.clone();
        wrong[0].1 += 1;
        let again = dir.path().join("again.db");
        assert!(matches!(
            export_rekeyed(&live, &[7; 32], &again, &[9; 32], &wrong),
            Err(StoreError::Damaged { .. })
        ));
    }

    fn open_path(path: &Path, k: DbKey) -> Result<SqliteStore, StoreError> {
        SqliteStore::open(SqliteOptions::new(path, k))
    }

    #[tokio::test]
    async fn encrypted_file_needs_the_right_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), DbKey::Raw([7; 32])).unwrap();
        s.register("alice".into(), key(1)).await.unwrap();
        s.close();
        let raw = std::fs::read(dir.path().join(DB_FILE_NAME)).unwrap();
        assert!(
            !raw.starts_with(b"SQLite format 3\0"),
            "file must be encrypted"
        );
        assert!(
            !raw.windows(5).any(|w| w == b"alice"),
            "plaintext visible in file"
        );
        match open(dir.path(), DbKey::Raw([8; 32])) {
            Err(StoreError::WrongKey { .. }) => {}
            other => panic!("expected WrongKey, got {other:?}"),
        }
        let s = open(dir.path(), DbKey::Raw([7; 32])).unwrap();
        assert_eq!(s.resolve("alice".into()).await.unwrap(), Some(key(1)));
    }

    async fn register_all(s: &SqliteStore, keys: &[u8]) {
        for k in keys {
            s.register(format!("user{k}"), key(*k)).await.unwrap();
        }
    }

    fn at(now_ms: u64, req: EnqueueRequest) -> EnqueueRequest {
        EnqueueRequest { now_ms, ..req }
    }

    /// A database written before migration 3 holds bare-hash keys; a retry
    /// of such a message is still dropped until its key expires.
    #[tokio::test]
    async fn keys_stored_before_the_upgrade_still_drop_retries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE_NAME);
        {
            let old = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..2] {
                old.execute_batch(sql).unwrap();
            }
            old.pragma_update(None, "user_version", 2).unwrap();
            old.execute(
                "INSERT INTO users (username, identity, created_at) VALUES ('u1', ?1, 0)",
                [key(1).as_bytes()],
            )
            .unwrap();
            // What the old enqueue stored for message 5: the bare hash.
            old.execute(
                "INSERT INTO dedup (key, expires_at) VALUES (?1, 70000)",
                [[5u8; 32]],
            )
            .unwrap();
        }
        let s = open(dir.path(), DbKey::Unencrypted).unwrap();
        let retry = |now| s.enqueue(at(now, enqueue_req(&[key(1)], 5, b"m", 10)));
        assert_eq!(retry(20_000).await.unwrap(), EnqueueOutcome::Duplicate);
        assert!(matches!(
            retry(70_000).await.unwrap(),
            EnqueueOutcome::Stored { .. }
        ));
        assert_eq!(retry(70_001).await.unwrap(), EnqueueOutcome::Duplicate);
        s.close();

        // The sweep finds expired keys through the index, not by reading
        // every key of the window.
        let c = Connection::open(&path).unwrap();
        let plan: Vec<String> = c
            .prepare("EXPLAIN QUERY PLAN DELETE FROM dedup WHERE expires_at <= 1")
            .unwrap()
            .query_map([], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter().any(|p| p.contains("dedup_by_expiry")),
            "{plan:?}"
        );
    }

    /// A database written before new databases moved to HMAC-SHA256 pages
    /// (SQLCipher 4's default settings) keeps opening, readers included.
    #[tokio::test]
    async fn a_database_with_sqlcipher_default_settings_keeps_working() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE_NAME);
        {
            let old = Connection::open(&path).unwrap();
            old.pragma_update(None, "key", format!("x'{}'", hex::encode([7u8; 32])))
                .unwrap();
            for sql in MIGRATIONS {
                old.execute_batch(sql).unwrap();
            }
            old.pragma_update(None, "user_version", MIGRATIONS.len())
                .unwrap();
            old.execute(
                "INSERT INTO users (username, identity, created_at) VALUES ('alice', ?1, 0)",
                [key(1).as_bytes()],
            )
            .unwrap();
        }
        let s = open(dir.path(), DbKey::Raw([7; 32])).unwrap();
        assert_eq!(s.resolve("alice".into()).await.unwrap(), Some(key(1)));
        s.register("bob".into(), key(2)).await.unwrap();
        assert_eq!(s.resolve("bob".into()).await.unwrap(), Some(key(2)));
        s.close();
        assert!(matches!(
            open(dir.path(), DbKey::Raw([8; 32])),
            Err(StoreError::WrongKey { .. })
        ));
        // Still in SQLCipher's default format: nothing rewrote it.
        let old = Connection::open(&path).unwrap();
        old.pragma_update(None, "key", format!("x'{}'", hex::encode([7u8; 32])))
            .unwrap();
        let users: i64 = old
            .query_row("SELECT count(*) FROM users", [], |r| r.get(0))
            .unwrap();
        assert_eq!(users, 2);
    }
}
