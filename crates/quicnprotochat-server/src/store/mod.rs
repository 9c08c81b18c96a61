//! Durable storage behind the delivery service.
//!
//! [`Store`] is what the RPC layer needs: the user directory, the key-package
//! directory and per-recipient message queues.  [`sqlite::SqliteStore`] is the
//! embedded default (SQLCipher through rusqlite, one file in the data
//! directory); [`postgres::PgStore`] keeps the same guarantees on one
//! PostgreSQL database shared by several server nodes.
//!
//! Every method is asynchronous and returns a boxed `Send` future so the trait
//! stays object-safe; implementations do their blocking work off the RPC
//! thread.

pub mod postgres;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;

use quicnprotochat_core::IdentityKey;

/// A boxed store future.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Storage failures.  None of these is caused by a peer's input; the RPC
/// layer maps every one of them to `internal` and logs the detail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// the database key does not decrypt the database file
    #[error("the database key does not open {path}: wrong key, or not a quicnprotochat database")]
    WrongKey {
        /// the database file
        path: String,
    },
    /// the database file is damaged (truncated, or pages that do not
    /// authenticate under the right key): restore it from a backup
    #[error("the database file {path} is damaged: {detail}; restore it from a backup")]
    Damaged {
        /// the database file
        path: String,
        /// what is damaged
        detail: String,
    },
    /// the SQLite library is not SQLCipher, so encryption would silently be off
    #[error("SQLCipher is not available in this build; refusing to store data unencrypted")]
    NoSqlCipher,
    /// the database was written by a newer server
    #[error("database schema version {found} is newer than this server's {supported}")]
    SchemaTooNew {
        /// version in the file
        found: i64,
        /// newest version this build knows
        supported: i64,
    },
    /// an SQLite error
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// an IO error around the database file
    #[error("database file: {0}")]
    Io(#[from] std::io::Error),
    /// the storage thread is gone (shut down or crashed)
    #[error("the storage worker has stopped")]
    WorkerGone,
    /// a transaction committed nothing because the batch commit failed
    #[error("commit failed: {0}")]
    Commit(String),
    /// a PostgreSQL error
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// no database connection could be had in time (the database is down,
    /// unreachable, or every pooled connection is busy)
    #[error("no database connection: {0}")]
    Unavailable(String),
    /// the database connection settings are invalid (never names the
    /// connection string: it may hold a password)
    #[error("database settings: {0}")]
    Config(String),
    /// the database's applied migrations do not match this build's
    #[error("database migrations: {0}")]
    Migration(String),
    /// a stored value is not what the schema promises
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => Self::Postgres(e),
            e => Self::Unavailable(e.to_string()),
        }
    }
}

impl StoreError {
    /// Whether the error means the database file is damaged (SQLite's
    /// "corrupt" or "not a database" on a file that opened): it does not
    /// heal by retrying; the operator restores a backup.
    pub fn is_damage(&self) -> bool {
        match self {
            Self::Damaged { .. } => true,
            Self::Sqlite(e) => matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
            ),
            _ => false,
        }
    }

    /// Whether the database aborted the transaction only because it ran
    /// alongside others (a deadlock victim, a serialization failure): the
    /// same transaction may succeed when run again.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Postgres(e) => matches!(
                e.code(),
                Some(c) if *c == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
                    || *c == tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
            ),
            _ => false,
        }
    }
}

/// Bytes of the message id that lead an idempotency key: the time part of
/// the ids clients make ([`quicnprotochat_core::group::MESSAGE_ID_TIME_BYTES`]).
const DEDUP_TIME_BYTES: usize = quicnprotochat_core::group::MESSAGE_ID_TIME_BYTES;

/// Bytes of SHA-256(sender || message id) that follow them: 192 bits.
const DEDUP_HASH_BYTES: usize = 24;

/// The stored idempotency key: the message id's leading time bytes, then
/// the first bytes of SHA-256(sender || message id).
///
/// Keys of messages sent one after the other sort one after the other, so
/// their inserts land on the rightmost pages of the index.  A bare hash put
/// every insert on a page of its own, and every such page was written (and
/// with SQLCipher encrypted) again at each commit: nearly half the cost of an
/// enqueue.  A client that picks ids at random still deduplicates correctly;
/// its inserts cost what every insert cost before.
pub(crate) fn dedup_key(req: &EnqueueRequest) -> [u8; DEDUP_TIME_BYTES + DEDUP_HASH_BYTES] {
    let mut key = [0u8; DEDUP_TIME_BYTES + DEDUP_HASH_BYTES];
    key[..DEDUP_TIME_BYTES].copy_from_slice(&req.message_id[..DEDUP_TIME_BYTES]);
    key[DEDUP_TIME_BYTES..].copy_from_slice(&req.dedup_key[..DEDUP_HASH_BYTES]);
    key
}

/// Result of registering a username.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// newly registered
    Registered,
    /// this exact (username, identity) pair already existed
    AlreadyRegistered,
    /// the username belongs to another identity
    UsernameTaken,
    /// the identity is registered under another username
    IdentityTaken,
}

/// A validated key package ready to be stored.
#[derive(Debug, Clone)]
pub struct NewKeyPackage {
    /// TLS-serialized package
    pub data: Vec<u8>,
    /// KeyPackageRef, unique per package
    pub hash_ref: Vec<u8>,
    /// carries the last_resort extension
    pub last_resort: bool,
    /// end of lifetime, Unix seconds
    pub not_after: u64,
}

/// Result of publishing key packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// stored this many (duplicates of already stored packages are skipped)
    Stored(u32),
    /// storing them would exceed the per-identity cap; nothing was stored
    OverCap {
        /// packages the identity already has
        have: u32,
    },
}

/// A key package handed out by [`Store::take_key_package`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenKeyPackage {
    /// TLS-serialized package
    pub data: Vec<u8>,
    /// it is the (retained) last-resort package
    pub last_resort: bool,
}

/// What the sender of an enqueue showed for one recipient (protocol
/// section 9.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented {
    /// the sender is the recipient: never a stranger
    Own,
    /// SHA-256 of the delivery token the sender presented
    Token([u8; 32]),
    /// no token
    Nothing,
}

impl Presented {
    /// Whether a message that showed this counts as a stranger's for a
    /// recipient whose delivery token hashes are `known` (current,
    /// previous): without a token or with a retired one, yes, unless the
    /// sender is the recipient; a recipient without a token (a client of
    /// wire version 1) has no stranger lane, so no.
    pub(crate) fn is_stranger(self, known: Option<(&[u8], Option<&[u8]>)>) -> bool {
        match (self, known) {
            (Self::Own, _) | (_, None) => false,
            (Self::Token(h), Some((current, previous))) => {
                current != h.as_slice() && previous != Some(h.as_slice())
            }
            (Self::Nothing, Some(_)) => true,
        }
    }
}

/// An enqueue request, already validated by the RPC layer.
#[derive(Debug, Clone)]
pub struct EnqueueRequest {
    /// distinct recipients
    pub recipients: Vec<IdentityKey>,
    /// the sender's message id
    pub message_id: [u8; 16],
    /// SHA-256(sender || message id), from which the store derives the
    /// idempotency key; the sender itself is not stored
    pub dedup_key: [u8; 32],
    /// opaque ciphertext
    pub payload: Vec<u8>,
    /// server receive time, Unix milliseconds
    pub now_ms: u64,
    /// queue depth cap per recipient
    pub max_depth: u64,
    /// how long the idempotency key is remembered, milliseconds
    pub dedup_window_ms: u64,
    /// set when the payload is an MLS commit: (group id, epoch).  At most one
    /// commit per group epoch is accepted (RFC 9750 §5.2: the delivery
    /// service breaks commit ties).
    pub commit: Option<(Vec<u8>, u64)>,
    /// per recipient, what the sender showed: a recipient with a delivery
    /// token counts a message without it as a stranger's
    pub presented: Vec<Presented>,
    /// a keyed hash of the sender, stored with a stranger's message while it
    /// is queued (to count its messages per sender); never the sender itself
    pub sender_tag: [u8; 16],
    /// most stranger messages one queue holds, besides `max_depth`
    pub stranger_depth: u64,
    /// most stranger messages from one sender in one queue
    pub stranger_per_sender: u64,
}

/// Result of an enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// stored; `seqs[i]` is the sequence number for `recipients[i]`
    Stored {
        /// per-recipient sequence numbers
        seqs: Vec<u64>,
    },
    /// the same (sender, message id) was stored before; nothing stored now
    Duplicate,
    /// this recipient's queue is full; nothing was stored for anyone
    QueueFull {
        /// index into `recipients`
        index: usize,
        /// full for strangers: the stranger lane, or this sender's share of
        /// it (members' room is untouched)
        stranger: bool,
    },
    /// a commit for this group's epoch was already accepted; nothing stored
    StaleEpoch {
        /// the epoch of the last accepted commit
        last_commit_epoch: u64,
    },
    /// this recipient is not a registered identity; nothing was stored
    UnknownRecipient {
        /// index into `recipients`
        index: usize,
    },
}

/// A queued message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    /// per-recipient sequence number
    pub seq: u64,
    /// the sender's message id
    pub message_id: Vec<u8>,
    /// opaque ciphertext
    pub payload: Vec<u8>,
    /// Unix milliseconds
    pub enqueued_at_ms: u64,
}

/// What a maintenance sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// expired key packages deleted
    pub key_packages: u64,
    /// expired idempotency keys deleted
    pub dedup_keys: u64,
}

/// The store's totals, for the operator (`admin stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    /// distinct identity keys the store holds anything for: a username, a
    /// key package, a queued message or a delivery token
    pub identities: u64,
    /// registered usernames
    pub usernames: u64,
    /// queues holding at least one message
    pub queues: u64,
    /// messages waiting in queues (one per recipient)
    pub messages: u64,
    /// bytes of stored payloads, each counted once however many recipients
    /// it waits for
    pub payload_bytes: u64,
    /// unexpired one-time key packages
    pub key_packages: u64,
    /// identities with an unexpired last-resort key package
    pub last_resort_key_packages: u64,
}

/// One queue as the operator sees it: no message contents or ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueInfo {
    /// whose queue
    pub recipient: IdentityKey,
    /// messages waiting
    pub depth: u64,
    /// when the oldest waiting message was enqueued, Unix milliseconds
    pub oldest_enqueued_at_ms: u64,
}

/// The key-package stock of one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPackageStock {
    /// the identity
    pub identity: IdentityKey,
    /// its username, if registered
    pub username: Option<String>,
    /// unexpired one-time packages
    pub one_time: u64,
    /// it has an unexpired last-resort package
    pub last_resort: bool,
}

/// What [`Store::unregister`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unregistered {
    /// the identity the username was bound to
    pub identity: IdentityKey,
    /// its key packages removed (one-time and last-resort)
    pub key_packages: u64,
}

/// A change to the queues committed by some node of a shared store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueChange {
    /// a message was committed to `recipient`'s queue as `seq`
    Committed {
        /// the queue
        recipient: IdentityKey,
        /// its sequence number
        seq: u64,
    },
    /// changes may have been missed (the notification channel was lost and
    /// is back, or the receiver fell behind): every live subscription reads
    /// its queue from the store
    Resync,
}

/// Queue changes committed through other nodes: `None` for a store that
/// only this node writes (the embedded store).
pub type QueueChanges = Option<tokio::sync::mpsc::Receiver<QueueChange>>;

/// The delivery service's storage.
pub trait Store: Send + Sync + 'static {
    /// Starts delivering the queue changes every node commits (this one's
    /// included), where other nodes share the store; called once, by the
    /// server, inside its runtime.
    fn changes(&self) -> QueueChanges {
        None
    }

    /// The store's incarnation: a random id made with the database and
    /// changed when it is restored from a backup.  Sequence numbers are
    /// comparable only within one incarnation.
    fn incarnation(&self) -> [u8; 16];

    /// Probes the store: a small write that must commit (durably), then a
    /// read of it.  A full disk, a read-only file or a stalled writer fail
    /// it.
    fn ping(&self) -> StoreFuture<'_, ()>;

    /// Checks every page of the database: `Some(what)` names the damage
    /// when pages fail their check (authentication under the key for an
    /// encrypted store), `None` when all pass.  Reads the whole file.
    fn integrity_check(&self) -> StoreFuture<'_, Option<String>>;

    /// Binds `username` to `identity`.
    fn register(&self, username: String, identity: IdentityKey)
    -> StoreFuture<'_, RegisterOutcome>;

    /// Looks a username up.
    fn resolve(&self, username: String) -> StoreFuture<'_, Option<IdentityKey>>;

    /// Stores validated key packages of `identity`.  A last-resort package
    /// replaces the previous one; at most `max_per_identity` one-time packages
    /// are kept.
    fn publish_key_packages(
        &self,
        identity: IdentityKey,
        packages: Vec<NewKeyPackage>,
        max_per_identity: u32,
    ) -> StoreFuture<'_, PublishOutcome>;

    /// Atomically removes and returns one unexpired one-time package of
    /// `identity`, or else returns its unexpired last-resort package (kept).
    fn take_key_package(
        &self,
        identity: IdentityKey,
        now_secs: u64,
    ) -> StoreFuture<'_, Option<TakenKeyPackage>>;

    /// Unexpired one-time packages of `identity`, and whether it has an
    /// unexpired last-resort package.
    fn key_package_count(
        &self,
        identity: IdentityKey,
        now_secs: u64,
    ) -> StoreFuture<'_, (u32, bool)>;

    /// Durably stores one payload for every recipient, or for none.
    fn enqueue(&self, request: EnqueueRequest) -> StoreFuture<'_, EnqueueOutcome>;

    /// Several enqueues, each exactly as [`Store::enqueue`] would do it on
    /// its own (atomic for its recipients, its fate independent of the
    /// others'), in order, so that two of them to one recipient get
    /// ascending sequence numbers in that order.  Every stored one is
    /// durable when this returns.  The default runs them one after the
    /// other; a store may commit them together.
    fn enqueue_batch(
        &self,
        requests: Vec<EnqueueRequest>,
    ) -> StoreFuture<'_, Vec<Result<EnqueueOutcome, StoreError>>> {
        Box::pin(async move {
            let mut outcomes = Vec::with_capacity(requests.len());
            for request in requests {
                outcomes.push(self.enqueue(request).await);
            }
            Ok(outcomes)
        })
    }

    /// Messages of `recipient` with `seq >= from_seq`, ascending, at most
    /// `limit` of them and about `max_bytes` of payload (always at least one).
    fn fetch(
        &self,
        recipient: IdentityKey,
        from_seq: u64,
        limit: u32,
        max_bytes: usize,
    ) -> StoreFuture<'_, Vec<QueuedMessage>>;

    /// Makes `token_hash` the current delivery token hash of `identity`;
    /// the current one, if different, becomes the previous one.
    fn set_delivery_token(
        &self,
        identity: IdentityKey,
        token_hash: [u8; 32],
    ) -> StoreFuture<'_, ()>;

    /// Deletes the messages of `recipient` with `seq <= up_to`; returns how many.
    fn ack(&self, recipient: IdentityKey, up_to: u64) -> StoreFuture<'_, u32>;

    /// Deletes expired key packages and idempotency keys.
    fn sweep(&self, now_secs: u64, now_ms: u64) -> StoreFuture<'_, SweepStats>;

    /// How many messages wait in all queues, and in the fullest one (the
    /// metrics' queue gauges; reads every queued row's recipient).
    fn queue_depth(&self) -> StoreFuture<'_, QueueDepth>;

    /// The store's totals (key packages: those unexpired at `now_secs`).
    fn stats(&self, now_secs: u64) -> StoreFuture<'_, StoreStats>;

    /// The `limit` deepest non-empty queues, deepest first (ties by
    /// identity).
    fn largest_queues(&self, limit: u32) -> StoreFuture<'_, Vec<QueueInfo>>;

    /// The key-package stock of every registered identity and every
    /// identity with key packages, fewest one-time packages first (ties by
    /// username, then identity), at most `limit` of them.
    fn key_package_stock(&self, now_secs: u64, limit: u32)
    -> StoreFuture<'_, Vec<KeyPackageStock>>;

    /// Frees `username`: removes its binding and the key packages of its
    /// identity, in one transaction; the identity's queue and delivery
    /// token stay (its owner can still read the queue; new messages to it
    /// are refused as to an unknown recipient).  `None` if no such
    /// username.
    fn unregister(&self, username: String) -> StoreFuture<'_, Option<Unregistered>>;
}

/// Messages waiting, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// in all queues
    pub messages: u64,
    /// in the fullest queue (members' and strangers' messages alike)
    pub largest: u64,
}
