//! The PostgreSQL store: several identical server nodes on one database.
//!
//! Every guarantee of the embedded store holds across nodes because the
//! database, not a node, decides:
//!
//! - **Sequence numbers** come from a per-recipient row in `queue_heads`,
//!   locked (`FOR UPDATE`) and incremented in the transaction that inserts
//!   the message: strictly increasing, no gaps (a rolled-back enqueue
//!   increments nothing), whichever node enqueues.
//! - **Idempotency** and **one commit per group epoch** are upserts whose
//!   conflict decides: a second transaction with the same key waits for the
//!   first and then sees its outcome.
//! - **A one-time key package is handed out once**: one `DELETE … RETURNING`
//!   of a row chosen `FOR UPDATE SKIP LOCKED`; the last-resort package is
//!   only read.
//! - **Sweeps** run under a transaction-scoped advisory lock that only one
//!   node at a time can take; the others skip that round.
//!
//! Locks are always taken in one order (queue heads sorted by recipient,
//! then payload rows sorted by id), so transactions do not deadlock; a
//! transaction the database aborts anyway (deadlock or serialization
//! failure) is retried a few times before its error is returned.
//!
//! **Push across nodes**: every enqueue announces each recipient's new
//! sequence number with `pg_notify` inside its transaction (PostgreSQL
//! delivers it at commit, in commit order); each node listens on one
//! connection of its own ([`Store::changes`]) and wakes its live
//! subscriptions, which read the message from the store.  A node whose
//! listening connection is lost reconnects with backoff and then has every
//! live subscription reread its queue, so nothing committed meanwhile is
//! missed; a subscription's cursor keeps anything from being pushed twice.
//!
//! Migrations are SQL files in `migrations/postgres/`, applied at start-up
//! under an advisory lock (nodes starting together apply each one once);
//! the checksum of every applied file is kept, and a changed released file
//! refuses to start.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures::StreamExt as _;
use quicnprotochat_core::IdentityKey;
use rustls::pki_types::pem::PemObject as _;
use tokio_postgres::types::ToSql;

use super::{
    EnqueueOutcome, EnqueueRequest, KeyPackageStock, NewKeyPackage, Presented, PublishOutcome,
    QueueChange, QueueChanges, QueueDepth, QueueInfo, QueuedMessage, RegisterOutcome, Store,
    StoreError, StoreFuture, StoreStats, SweepStats, TakenKeyPackage, Unregistered, dedup_key,
};
use crate::metrics::StoreMetrics;

/// Schema migrations, applied in order.  Never edit a released entry: add one.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "initial",
    include_str!("../../migrations/postgres/0001_initial.sql"),
)];

/// Advisory lock class of this store (the first of the two 32-bit keys);
/// the second key names the lock.
const LOCK_CLASS: i32 = 0x7163_6e70; // "qcnp"
/// Held while migrations are applied.
const LOCK_MIGRATE: i32 = 1;
/// Held (per transaction) by the node that sweeps.
const LOCK_SWEEP: i32 = 2;

/// The notification channel of queue changes.
const CHANNEL: &str = "quicnprotochat_queue";
/// How often the listening connection is checked (a connection that died
/// without a word, e.g. behind a lost network path, fails the check).
const LISTEN_CHECK: Duration = Duration::from_secs(10);
/// Queue changes waiting for the server (beyond: a resync).
const CHANGE_BUFFER: usize = 4096;
/// Longest wait between attempts to listen again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Times a transaction aborted by a deadlock or a serialization failure is
/// run again before its error is returned.
const RETRIES: u32 = 3;

/// Options of [`PgStore::connect`].
#[derive(Clone)]
pub struct PgOptions {
    /// connection string: a `postgresql://` URL or `key=value` pairs (may
    /// hold a password: never logged)
    pub url: String,
    /// PEM file of the certificate authorities that sign the database
    /// server's certificate: when set, every TCP connection is TLS (required,
    /// whatever `sslmode` says short of `disable`, which is refused) and the
    /// server's certificate chain and host name are verified, as libpq's
    /// `sslmode=verify-full` does
    pub ca_file: Option<PathBuf>,
    /// most connections this node opens
    pub pool_size: usize,
    /// how long opening a connection, or waiting for a free one, may take
    pub connect_timeout: Duration,
    /// where transaction and commit times are counted
    pub metrics: StoreMetrics,
}

impl fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &"<redacted>")
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl PgOptions {
    /// Defaults for the database at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_file: None,
            pool_size: crate::config::DEFAULT_DATABASE_POOL_SIZE,
            connect_timeout: Duration::from_secs(5),
            metrics: StoreMetrics::default(),
        }
    }

    /// Parses the connection string.  The error names what is wrong, never
    /// the string itself (it may hold a password).
    pub fn parse(&self) -> Result<tokio_postgres::Config, StoreError> {
        let mut config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Config(e.to_string()))?;
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            return Err(StoreError::Config(
                "no host: name the server (`host=` or the URL's host; a directory for a Unix socket)"
                    .into(),
            ));
        }
        if self.ca_file.is_some() {
            if config.get_ssl_mode() == tokio_postgres::config::SslMode::Disable {
                return Err(StoreError::Config(
                    "sslmode=disable contradicts database_ca (which makes every connection TLS)"
                        .into(),
                ));
            }
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(self.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("quicnprotochat-server");
        }
        Ok(config)
    }
}

/// How connections are made: TLS with verified certificates when the
/// operator named the certificate authorities, plain otherwise.
#[derive(Clone)]
enum Connector {
    Plain,
    Tls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Connector {
    fn from_options(options: &PgOptions) -> Result<Self, StoreError> {
        let Some(path) = &options.ca_file else {
            return Ok(Self::Plain);
        };
        let tls = StoreError::Config;
        let mut roots = rustls::RootCertStore::empty();
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| tls(format!("database_ca {}: {e}", path.display())))?;
        for cert in certs {
            let cert = cert.map_err(|e| tls(format!("database_ca {}: {e}", path.display())))?;
            roots
                .add(cert)
                .map_err(|e| tls(format!("database_ca {}: {e}", path.display())))?;
        }
        if roots.is_empty() {
            return Err(tls(format!(
                "database_ca {}: no certificate in the file",
                path.display()
            )));
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self::Tls(tokio_postgres_rustls::MakeRustlsConnect::new(
            config,
        )))
    }

    /// Opens a connection whose notifications arrive on the returned
    /// receiver (which ends when the connection does); the task drives the
    /// connection until then.
    async fn listening_connection(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<Listening, StoreError> {
        Ok(match self {
            Self::Plain => drive(config.connect(tokio_postgres::NoTls).await?),
            Self::Tls(tls) => drive(config.connect(tls.clone()).await?),
        })
    }
}

/// A connection driven by a task of its own, and its notifications.
type Listening = (
    tokio_postgres::Client,
    tokio::sync::mpsc::Receiver<tokio_postgres::Notification>,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
);

fn drive<S, T>(
    (client, mut connection): (tokio_postgres::Client, tokio_postgres::Connection<S, T>),
) -> Listening
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (ntx, nrx) = tokio::sync::mpsc::channel::<tokio_postgres::Notification>(CHANGE_BUFFER);
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message?
                && ntx.send(n).await.is_err()
            {
                break;
            }
        }
        Ok(())
    });
    (client, nrx, driver)
}

/// PostgreSQL-backed [`Store`].
pub struct PgStore {
    pool: Pool,
    /// for the listening connection
    config: tokio_postgres::Config,
    connector: Connector,
    incarnation: [u8; 16],
    probes: AtomicU64,
    metrics: StoreMetrics,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.pool.status();
        f.debug_struct("PgStore")
            .field("pool_size", &status.max_size)
            .finish_non_exhaustive()
    }
}

/// How a transaction ends.
enum Done<T> {
    Commit(T),
    Rollback(T),
}

/// Runs `$body` (an expression awaiting statements on `$tx`, giving a
/// `Result<Done<T>, StoreError>`) in a transaction on a pooled connection,
/// again when the database aborted it as a deadlock victim or for a
/// serialization failure.
macro_rules! in_transaction {
    ($store:expr, |$tx:ident| $body:expr) => {
        in_transaction!($store, |$tx| $body, 1)
    };
    // `$jobs`: the writes the transaction carries (for the metrics).
    ($store:expr, |$tx:ident| $body:expr, $jobs:expr) => {{
        let mut attempt = 0_u32;
        loop {
            let mut client = $store.client().await?;
            let started = tokio::time::Instant::now();
            let mut transaction = client.transaction().await?;
            // `$tx` is `&mut` (savepoints need it; everything else reads
            // through it as `&`).
            let outcome: Result<Done<_>, StoreError> = {
                let $tx = &mut transaction;
                $body
            };
            let $tx = transaction;
            let result = match outcome {
                Ok(Done::Commit(v)) => {
                    let committing = tokio::time::Instant::now();
                    let committed = $tx.commit().await;
                    if committed.is_ok() {
                        $store
                            .metrics
                            .transaction($jobs, started.elapsed(), committing.elapsed());
                    }
                    committed.map(|()| v).map_err(StoreError::from)
                }
                Ok(Done::Rollback(v)) => {
                    $tx.rollback().await.map(|()| v).map_err(StoreError::from)
                }
                Err(e) => Err(e),
            };
            match result {
                Err(e) if e.is_transient() && attempt < RETRIES => {
                    attempt += 1;
                    tracing::debug!(attempt, error = %e, "store transaction aborted; running it again");
                }
                other => break other,
            }
        }
    }};
}

impl PgStore {
    /// Connects, applies the migrations this database lacks, and reads the
    /// store's incarnation.  A database unreachable within the connect
    /// timeout is an error: the node does not start without its store.
    pub async fn connect(options: PgOptions) -> Result<Self, StoreError> {
        let config = options.parse()?;
        let connector = Connector::from_options(&options)?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &connector {
            Connector::Plain => {
                Manager::from_config(config.clone(), tokio_postgres::NoTls, manager_config)
            }
            Connector::Tls(tls) => {
                Manager::from_config(config.clone(), tls.clone(), manager_config)
            }
        };
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.connect_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        let store = Self {
            pool,
            config,
            connector,
            incarnation: [0; 16],
            probes: AtomicU64::new(0),
            metrics: options.metrics.clone(),
        };
        store.migrate().await?;
        let row = store
            .client()
            .await?
            .query_one("SELECT id FROM incarnation WHERE row_id = 1", &[])
            .await?;
        let id: Vec<u8> = row.try_get(0)?;
        let incarnation = id.try_into().map_err(|_| StoreError::Damaged {
            path: "incarnation".into(),
            detail: "the store incarnation is not 16 bytes".into(),
        })?;
        Ok(Self {
            incarnation,
            ..store
        })
    }

    /// Closes every pooled connection.
    pub fn close(&self) {
        self.pool.close();
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(StoreError::from)
    }

    /// Applies missing migrations under the migration lock.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        client
            .execute(
                &client
                    .prepare_cached("SELECT pg_advisory_lock($1, $2)")
                    .await?,
                &[&LOCK_CLASS, &LOCK_MIGRATE],
            )
            .await?;
        let result = apply_migrations(&mut client).await;
        let unlocked = client
            .execute(
                &client
                    .prepare_cached("SELECT pg_advisory_unlock($1, $2)")
                    .await?,
                &[&LOCK_CLASS, &LOCK_MIGRATE],
            )
            .await;
        result?;
        unlocked?;
        Ok(())
    }

    /// Whether the database makes a commit durable before it answers:
    /// `None` when it does, otherwise the setting that makes it not
    /// (`fsync = off`, or `synchronous_commit = off`).
    pub async fn durability_problem(&self) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let setting = |name: &'static str| {
            let client = &client;
            async move {
                let row = client.query_one(&format!("SHOW {name}"), &[]).await?;
                Ok::<String, StoreError>(row.try_get::<_, String>(0)?)
            }
        };
        if setting("fsync").await? == "off" {
            return Ok(Some("the database runs with fsync = off".into()));
        }
        if setting("synchronous_commit").await? == "off" {
            return Ok(Some(
                "the database runs with synchronous_commit = off".into(),
            ));
        }
        Ok(None)
    }

    /// Schema version of the database (the newest applied migration).
    pub async fn schema_version(&self) -> Result<i32, StoreError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT coalesce(max(version), 0) FROM quicnprotochat_migrations",
                &[],
            )
            .await?;
        Ok(row.try_get(0)?)
    }
}

async fn apply_migrations(client: &mut deadpool_postgres::Client) -> Result<(), StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS quicnprotochat_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                sha256     bytea NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await?;
    let applied: Vec<(i32, Vec<u8>)> = client
        .query(
            &client
                .prepare_cached(
                    "SELECT version, sha256 FROM quicnprotochat_migrations ORDER BY version",
                )
                .await?,
            &[],
        )
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, tokio_postgres::Error>>()?;
    let supported = MIGRATIONS.last().map_or(0, |(v, _, _)| *v);
    if let Some((found, _)) = applied.iter().find(|(v, _)| *v > supported) {
        return Err(StoreError::SchemaTooNew {
            found: i64::from(*found),
            supported: i64::from(supported),
        });
    }
    for (version, name, sql) in MIGRATIONS {
        let digest = ring::digest::digest(&ring::digest::SHA256, sql.as_bytes());
        if let Some((_, stored)) = applied.iter().find(|(v, _)| v == version) {
            if stored.as_slice() != digest.as_ref() {
                return Err(StoreError::Migration(format!(
                    "migration {version} ({name}) differs from the one applied to this database; \
                     released migrations must never change"
                )));
            }
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            &tx.prepare_cached(
                "INSERT INTO quicnprotochat_migrations (version, name, sha256) VALUES ($1, $2, $3)",
            )
            .await?,
            &[version, name, &digest.as_ref()],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied database migration");
    }
    Ok(())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A per-identity advisory lock key (a 64-bit key: its own key space, apart
/// from the two-key locks above).  Two identities sharing a key only wait
/// for each other.
fn identity_lock(identity: &IdentityKey) -> i64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&identity.as_bytes()[..8]);
    i64::from_be_bytes(first)
}

impl Store for PgStore {
    fn incarnation(&self) -> [u8; 16] {
        self.incarnation
    }

    fn changes(&self) -> QueueChanges {
        let (tx, rx) = tokio::sync::mpsc::channel(CHANGE_BUFFER);
        tokio::spawn(listen(self.config.clone(), self.connector.clone(), tx));
        Some(rx)
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        let probe = to_i64(self.probes.fetch_add(1, Ordering::Relaxed));
        Box::pin(async move {
            let client = self.client().await?;
            client
                .execute(
                    &client
                        .prepare_cached(
                            "INSERT INTO meta (name, value) VALUES ('health_probe', $1)
                     ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                        )
                        .await?,
                    &[&probe],
                )
                .await?;
            client
                .query_one(
                    &client
                        .prepare_cached("SELECT value FROM meta WHERE name = 'health_probe'")
                        .await?,
                    &[],
                )
                .await?;
            Ok(())
        })
    }

    /// PostgreSQL checks its own pages (data checksums, when the cluster was
    /// initialised with them); there is no file of ours to read.
    fn integrity_check(&self) -> StoreFuture<'_, Option<String>> {
        Box::pin(async { Ok(None) })
    }

    fn register(
        &self,
        username: String,
        identity: IdentityKey,
    ) -> StoreFuture<'_, RegisterOutcome> {
        Box::pin(async move {
            let client = self.client().await?;
            let id = identity.as_bytes().as_slice();
            let inserted = client
                .execute(
                    &client
                        .prepare_cached(
                            "INSERT INTO users (username, identity, created_at)
                     VALUES ($1, $2, extract(epoch FROM now())::bigint)
                     ON CONFLICT DO NOTHING",
                        )
                        .await?,
                    &[&username, &id],
                )
                .await?;
            if inserted == 1 {
                return Ok(RegisterOutcome::Registered);
            }
            let owner = client
                .query_opt(
                    &client
                        .prepare_cached("SELECT identity FROM users WHERE username = $1")
                        .await?,
                    &[&username],
                )
                .await?;
            Ok(match owner {
                Some(row) if row.try_get::<_, &[u8]>(0)? == id => {
                    RegisterOutcome::AlreadyRegistered
                }
                Some(_) => RegisterOutcome::UsernameTaken,
                None => RegisterOutcome::IdentityTaken,
            })
        })
    }

    fn resolve(&self, username: String) -> StoreFuture<'_, Option<IdentityKey>> {
        Box::pin(async move {
            let row = self
                .client()
                .await?
                .query_opt(
                    "SELECT identity FROM users WHERE username = $1",
                    &[&username],
                )
                .await?;
            row.map(|r| {
                let bytes: &[u8] = r.try_get(0)?;
                IdentityKey::from_slice(bytes)
                    .map_err(|_| StoreError::Corrupt("a stored identity is not 32 bytes".into()))
            })
            .transpose()
        })
    }

    fn publish_key_packages(
        &self,
        identity: IdentityKey,
        packages: Vec<NewKeyPackage>,
        max_per_identity: u32,
    ) -> StoreFuture<'_, PublishOutcome> {
        Box::pin(async move {
            in_transaction!(self, |tx| publish_tx(
                tx,
                &identity,
                &packages,
                max_per_identity
            )
            .await)
        })
    }

    fn take_key_package(
        &self,
        identity: IdentityKey,
        now_secs: u64,
    ) -> StoreFuture<'_, Option<TakenKeyPackage>> {
        Box::pin(async move {
            let client = self.client().await?;
            let id = identity.as_bytes().as_slice();
            let now = to_i64(now_secs);
            // One statement takes the row: a concurrent taker skips it.
            let one_time = client
                .query_opt(
                    &client
                        .prepare_cached(
                            "DELETE FROM key_packages WHERE id = (
                        SELECT id FROM key_packages
                        WHERE identity = $1 AND NOT last_resort AND not_after > $2
                        ORDER BY id LIMIT 1
                        FOR UPDATE SKIP LOCKED)
                     RETURNING data",
                        )
                        .await?,
                    &[&id, &now],
                )
                .await?;
            if let Some(row) = one_time {
                return Ok(Some(TakenKeyPackage {
                    data: row.try_get(0)?,
                    last_resort: false,
                }));
            }
            let last_resort = client
                .query_opt(
                    &client
                        .prepare_cached(
                            "SELECT data FROM key_packages
                     WHERE identity = $1 AND last_resort AND not_after > $2
                     ORDER BY id DESC LIMIT 1",
                        )
                        .await?,
                    &[&id, &now],
                )
                .await?;
            last_resort
                .map(|row| {
                    Ok(TakenKeyPackage {
                        data: row.try_get(0)?,
                        last_resort: true,
                    })
                })
                .transpose()
        })
    }

    fn key_package_count(
        &self,
        identity: IdentityKey,
        now_secs: u64,
    ) -> StoreFuture<'_, (u32, bool)> {
        Box::pin(async move {
            let row = self
                .client()
                .await?
                .query_one(
                    "SELECT count(*) FILTER (WHERE NOT last_resort),
                            count(*) FILTER (WHERE last_resort)
                     FROM key_packages WHERE identity = $1 AND not_after > $2",
                    &[&identity.as_bytes().as_slice(), &to_i64(now_secs)],
                )
                .await?;
            let one_time: i64 = row.try_get(0)?;
            let last_resort: i64 = row.try_get(1)?;
            Ok((u32::try_from(one_time).unwrap_or(u32::MAX), last_resort > 0))
        })
    }

    fn enqueue(&self, req: EnqueueRequest) -> StoreFuture<'_, EnqueueOutcome> {
        Box::pin(async move { in_transaction!(self, |tx| enqueue_tx(tx, &req).await) })
    }

    fn enqueue_batch(
        &self,
        requests: Vec<EnqueueRequest>,
    ) -> StoreFuture<'_, Vec<Result<EnqueueOutcome, StoreError>>> {
        // One transaction (one WAL flush) for the batch, each request in a
        // savepoint: a refusal rolls back only its own claim.  A deadlock
        // or serialization failure runs the whole batch again.
        Box::pin(async move {
            in_transaction!(
                self,
                |tx| {
                    lock_heads(tx, &requests).await?;
                    let mut outcomes = Vec::with_capacity(requests.len());
                    for req in &requests {
                        let savepoint = tx.savepoint("enqueue").await?;
                        match enqueue_tx(&savepoint, req).await {
                            Ok(Done::Commit(v)) => {
                                savepoint.commit().await?;
                                outcomes.push(Ok(v));
                            }
                            Ok(Done::Rollback(v)) => {
                                savepoint.rollback().await?;
                                outcomes.push(Ok(v));
                            }
                            Err(e) if e.is_transient() => return Err(e),
                            Err(e) => {
                                savepoint.rollback().await?;
                                outcomes.push(Err(e));
                            }
                        }
                    }
                    Ok(Done::Commit(outcomes))
                },
                requests.len()
            )
        })
    }

    fn fetch(
        &self,
        recipient: IdentityKey,
        from_seq: u64,
        limit: u32,
        max_bytes: usize,
    ) -> StoreFuture<'_, Vec<QueuedMessage>> {
        Box::pin(async move {
            let client = self.client().await?;
            let id = recipient.as_bytes().as_slice();
            let from = to_i64(from_seq);
            let limit = i64::from(limit);
            let params: [&(dyn ToSql + Sync); 3] = [&id, &from, &limit];
            let rows = client
                .query_raw(
                    "SELECT q.seq, q.message_id, q.enqueued_at, p.data
                     FROM queue q JOIN payloads p ON p.id = q.payload_id
                     WHERE q.recipient = $1 AND q.seq >= $2
                     ORDER BY q.seq LIMIT $3",
                    params,
                )
                .await?;
            futures::pin_mut!(rows);
            let mut out = Vec::new();
            let mut bytes = 0_usize;
            // Rows stream in: stop reading once the budget is spent.
            while let Some(row) = rows.next().await {
                let row = row?;
                let payload: Vec<u8> = row.try_get(3)?;
                bytes += payload.len();
                out.push(QueuedMessage {
                    seq: to_u64(row.try_get(0)?),
                    message_id: row.try_get(1)?,
                    enqueued_at_ms: to_u64(row.try_get(2)?),
                    payload,
                });
                if bytes >= max_bytes {
                    break;
                }
            }
            Ok(out)
        })
    }

    fn set_delivery_token(
        &self,
        identity: IdentityKey,
        token_hash: [u8; 32],
    ) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.client()
                .await?
                .execute(
                    "INSERT INTO delivery_tokens AS t (identity, current, previous)
                     VALUES ($1, $2, NULL)
                     ON CONFLICT (identity) DO UPDATE SET
                         previous = CASE WHEN t.current = excluded.current
                                         THEN t.previous ELSE t.current END,
                         current = excluded.current",
                    &[&identity.as_bytes().as_slice(), &token_hash.as_slice()],
                )
                .await?;
            Ok(())
        })
    }

    fn ack(&self, recipient: IdentityKey, up_to: u64) -> StoreFuture<'_, u32> {
        Box::pin(async move { in_transaction!(self, |tx| ack_tx(tx, &recipient, up_to).await) })
    }

    fn sweep(&self, now_secs: u64, now_ms: u64) -> StoreFuture<'_, SweepStats> {
        Box::pin(async move {
            in_transaction!(self, |tx| {
                async {
                    let mine: bool = tx
                        .query_one(
                            &tx.prepare_cached("SELECT pg_try_advisory_xact_lock($1, $2)")
                                .await?,
                            &[&LOCK_CLASS, &LOCK_SWEEP],
                        )
                        .await?
                        .try_get(0)?;
                    if !mine {
                        // Another node is sweeping right now.
                        return Ok(Done::Rollback(SweepStats::default()));
                    }
                    let key_packages = tx
                        .execute(
                            &tx.prepare_cached("DELETE FROM key_packages WHERE not_after <= $1")
                                .await?,
                            &[&to_i64(now_secs)],
                        )
                        .await?;
                    let dedup_keys = tx
                        .execute(
                            &tx.prepare_cached("DELETE FROM dedup WHERE expires_at <= $1")
                                .await?,
                            &[&to_i64(now_ms)],
                        )
                        .await?;
                    Ok(Done::Commit(SweepStats {
                        key_packages,
                        dedup_keys,
                    }))
                }
                .await
            })
        })
    }

    fn queue_depth(&self) -> StoreFuture<'_, QueueDepth> {
        Box::pin(async move {
            let row = self
                .client()
                .await?
                .query_one(
                    "SELECT coalesce(sum(depth), 0)::bigint, coalesce(max(depth), 0)::bigint
                     FROM queue_heads",
                    &[],
                )
                .await?;
            Ok(QueueDepth {
                messages: to_u64(row.try_get(0)?),
                largest: to_u64(row.try_get(1)?),
            })
        })
    }

    fn stats(&self, now_secs: u64) -> StoreFuture<'_, StoreStats> {
        Box::pin(async move {
            let mut client = self.client().await?;
            // One snapshot: the totals agree with each other.
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let now = to_i64(now_secs);
            let row = tx
                .query_one(
                    "SELECT
                        (SELECT count(*) FROM (
                            SELECT identity FROM users
                            UNION SELECT identity FROM key_packages
                            UNION SELECT recipient FROM queue
                            UNION SELECT identity FROM delivery_tokens) i),
                        (SELECT count(*) FROM users),
                        (SELECT count(DISTINCT recipient) FROM queue),
                        (SELECT count(*) FROM queue),
                        (SELECT coalesce(sum(length(data)), 0)::bigint FROM payloads),
                        (SELECT count(*) FROM key_packages WHERE NOT last_resort AND not_after > $1),
                        (SELECT count(DISTINCT identity) FROM key_packages
                         WHERE last_resort AND not_after > $1)",
                    &[&now],
                )
                .await?;
            tx.commit().await?;
            let get = |i: usize| -> Result<u64, StoreError> { Ok(to_u64(row.try_get(i)?)) };
            Ok(StoreStats {
                identities: get(0)?,
                usernames: get(1)?,
                queues: get(2)?,
                messages: get(3)?,
                payload_bytes: get(4)?,
                key_packages: get(5)?,
                last_resort_key_packages: get(6)?,
            })
        })
    }

    fn largest_queues(&self, limit: u32) -> StoreFuture<'_, Vec<QueueInfo>> {
        Box::pin(async move {
            let rows = self
                .client()
                .await?
                .query(
                    "SELECT recipient, count(*) AS depth, min(enqueued_at) FROM queue
                     GROUP BY recipient ORDER BY depth DESC, recipient LIMIT $1",
                    &[&i64::from(limit)],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(QueueInfo {
                        recipient: identity_of(r.try_get(0)?)?,
                        depth: to_u64(r.try_get(1)?),
                        oldest_enqueued_at_ms: to_u64(r.try_get(2)?),
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
        Box::pin(async move {
            let rows = self
                .client()
                .await?
                .query(
                    "SELECT i.identity, u.username,
                        (SELECT count(*) FROM key_packages k
                         WHERE k.identity = i.identity AND NOT k.last_resort
                           AND k.not_after > $1) AS one_time,
                        EXISTS (SELECT 1 FROM key_packages k
                         WHERE k.identity = i.identity AND k.last_resort AND k.not_after > $1)
                     FROM (SELECT identity FROM users UNION SELECT identity FROM key_packages) i
                     LEFT JOIN users u ON u.identity = i.identity
                     ORDER BY one_time, u.username IS NULL, u.username COLLATE \"C\", i.identity
                     LIMIT $2",
                    &[&to_i64(now_secs), &i64::from(limit)],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(KeyPackageStock {
                        identity: identity_of(r.try_get(0)?)?,
                        username: r.try_get(1)?,
                        one_time: to_u64(r.try_get(2)?),
                        last_resort: r.try_get(3)?,
                    })
                })
                .collect()
        })
    }

    fn unregister(&self, username: String) -> StoreFuture<'_, Option<Unregistered>> {
        Box::pin(async move {
            in_transaction!(self, |tx| {
                async {
                    let Some(row) = tx
                        .query_opt(
                            "DELETE FROM users WHERE username = $1 RETURNING identity",
                            &[&username],
                        )
                        .await?
                    else {
                        return Ok(Done::Rollback(None));
                    };
                    let identity: &[u8] = row.try_get(0)?;
                    let key_packages = tx
                        .execute("DELETE FROM key_packages WHERE identity = $1", &[&identity])
                        .await?;
                    Ok(Done::Commit(Some(Unregistered {
                        identity: identity_of(identity)?,
                        key_packages,
                    })))
                }
                .await
            })
        })
    }
}

fn identity_of(bytes: &[u8]) -> Result<IdentityKey, StoreError> {
    IdentityKey::from_slice(bytes)
        .map_err(|_| StoreError::Corrupt("a stored identity is not 32 bytes".into()))
}

/// Listens for queue changes until the receiver is dropped, reconnecting
/// with backoff whenever the connection is lost.
async fn listen(
    config: tokio_postgres::Config,
    connector: Connector,
    tx: tokio::sync::mpsc::Sender<QueueChange>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut lagged = false;
    loop {
        let started = tokio::time::Instant::now();
        match listen_once(&config, &connector, &tx, &mut lagged).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(
                error = %e,
                "lost the database's notification channel: other nodes' messages reach this node's subscriptions when it is back"
            ),
        }
        if started.elapsed() > MAX_BACKOFF * 2 {
            backoff = Duration::from_millis(100);
        }
        // Up to half again, so that nodes that lost the database together
        // do not all come back at the same instant.
        let jitter = random_u64() % (u64::try_from(backoff.as_millis()).unwrap_or(1) / 2 + 1);
        tokio::select! {
            () = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
            () = tx.closed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A random number (for jitter; zero if the system generator fails).
fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => 0,
    }
}

/// One listening connection: `Ok` when the receiver is gone, `Err` when the
/// connection is.
async fn listen_once(
    config: &tokio_postgres::Config,
    connector: &Connector,
    tx: &tokio::sync::mpsc::Sender<QueueChange>,
    lagged: &mut bool,
) -> Result<(), StoreError> {
    let (client, mut nrx, driver) = connector.listening_connection(config).await?;
    let result = async {
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        tracing::info!("listening for other nodes' messages");
        // Whatever was committed while this node was not listening is in
        // the store: every live subscription reads its queue.
        *lagged = true;
        let mut check = tokio::time::interval(LISTEN_CHECK);
        check.tick().await;
        loop {
            if *lagged && tx.try_send(QueueChange::Resync).is_ok() {
                *lagged = false;
            }
            tokio::select! {
                n = nrx.recv() => {
                    let Some(n) = n else {
                        return Err(StoreError::Unavailable("the listening connection closed".into()));
                    };
                    if let Some(change) = parse_change(n.payload())
                        && !*lagged
                    {
                        match tx.try_send(change) {
                            Ok(()) => {}
                            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => *lagged = true,
                            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                        }
                    }
                }
                _ = check.tick() => {
                    match tokio::time::timeout(Duration::from_secs(5), client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => return Err(StoreError::Unavailable("the listening connection stopped answering".into())),
                    }
                }
                () = tx.closed() => return Ok(()),
            }
        }
    }
    .await;
    drop(client);
    driver.abort();
    result
}

/// A notification's payload: the recipient in hex, `:`, the sequence number.
fn parse_change(payload: &str) -> Option<QueueChange> {
    let (recipient, seq) = payload.split_once(':')?;
    let recipient = IdentityKey::from_slice(&hex::decode(recipient).ok()?).ok()?;
    Some(QueueChange::Committed {
        recipient,
        seq: seq.parse().ok()?,
    })
}

async fn publish_tx(
    tx: &deadpool_postgres::Transaction<'_>,
    identity: &IdentityKey,
    packages: &[NewKeyPackage],
    max_per_identity: u32,
) -> Result<Done<PublishOutcome>, StoreError> {
    let id = identity.as_bytes().as_slice();
    // Publishes of one identity (through any node) take turns, so the cap
    // holds under concurrency.
    tx.execute(
        &tx.prepare_cached("SELECT pg_advisory_xact_lock($1)")
            .await?,
        &[&identity_lock(identity)],
    )
    .await?;
    let have: i64 = tx
        .query_one(
            &tx.prepare_cached(
                "SELECT count(*) FROM key_packages WHERE identity = $1 AND NOT last_resort",
            )
            .await?,
            &[&id],
        )
        .await?
        .try_get(0)?;
    let refs: Vec<&[u8]> = packages
        .iter()
        .filter(|p| !p.last_resort)
        .map(|p| p.hash_ref.as_slice())
        .collect();
    let existing: Vec<Vec<u8>> = tx
        .query(
            &tx.prepare_cached("SELECT hash_ref FROM key_packages WHERE hash_ref = ANY($1)")
                .await?,
            &[&refs],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let mut fresh = std::collections::HashSet::new();
    for r in refs {
        if !existing.iter().any(|e| e.as_slice() == r) {
            fresh.insert(r);
        }
    }
    let fresh_one_time = i64::try_from(fresh.len()).unwrap_or(i64::MAX);
    if have.saturating_add(fresh_one_time) > i64::from(max_per_identity) {
        return Ok(Done::Rollback(PublishOutcome::OverCap {
            have: u32::try_from(have).unwrap_or(u32::MAX),
        }));
    }
    let mut stored = 0_u32;
    for p in packages {
        if p.last_resort {
            tx.execute(
                &tx.prepare_cached("DELETE FROM key_packages WHERE identity = $1 AND last_resort")
                    .await?,
                &[&id],
            )
            .await?;
        }
        let n = tx
            .execute(
                &tx.prepare_cached(
                    "INSERT INTO key_packages (identity, hash_ref, data, last_resort, not_after)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (hash_ref) DO NOTHING",
                )
                .await?,
                &[
                    &id,
                    &p.hash_ref.as_slice(),
                    &p.data.as_slice(),
                    &p.last_resort,
                    &to_i64(p.not_after),
                ],
            )
            .await?;
        stored += u32::try_from(n).unwrap_or(0);
    }
    Ok(Done::Commit(PublishOutcome::Stored(stored)))
}

/// A recipient's delivery token hashes: identity, current, previous.
type TokenRow = (Vec<u8>, Vec<u8>, Option<Vec<u8>>);

/// A queue head as read under its lock.
struct Head {
    next_seq: i64,
    depth: i64,
    strangers: i64,
}

/// Locks the queue heads of every registered recipient of `requests` up
/// front, in one order (sorted), creating missing ones: each enqueue locks
/// its own recipients' heads sorted, but a batch's enqueues one after the
/// other would lock the union in no particular order, and batches racing
/// on other nodes would deadlock.
async fn lock_heads(
    tx: &deadpool_postgres::Transaction<'_>,
    requests: &[EnqueueRequest],
) -> Result<(), StoreError> {
    let mut all: Vec<&[u8]> = requests
        .iter()
        .flat_map(|r| r.recipients.iter().map(|k| k.as_bytes().as_slice()))
        .collect();
    all.sort_unstable();
    all.dedup();
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO queue_heads (recipient, next_seq, depth, strangers)
         SELECT r, 1, 0, 0 FROM unnest($1::bytea[]) AS t (r)
         WHERE EXISTS (SELECT 1 FROM users WHERE identity = r) ORDER BY r
         ON CONFLICT (recipient) DO NOTHING",
        )
        .await?,
        &[&all],
    )
    .await?;
    tx.execute(
        &tx.prepare_cached(
            "SELECT 1 FROM queue_heads WHERE recipient = ANY($1) ORDER BY recipient FOR UPDATE",
        )
        .await?,
        &[&all],
    )
    .await?;
    Ok(())
}

async fn enqueue_tx(
    tx: &deadpool_postgres::Transaction<'_>,
    req: &EnqueueRequest,
) -> Result<Done<EnqueueOutcome>, StoreError> {
    let now = to_i64(req.now_ms);
    let key = dedup_key(req);
    let expires = to_i64(req.now_ms.saturating_add(req.dedup_window_ms));
    // Claim the idempotency key.  A live key (this message stored before)
    // claims nothing; a concurrent retry waits here for this transaction
    // and then finds the key live.
    let claimed = tx
        .query_opt(
            &tx.prepare_cached(
                "INSERT INTO dedup AS d (key, expires_at) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at
             WHERE d.expires_at <= $3
             RETURNING 1",
            )
            .await?,
            &[&key.as_slice(), &expires, &now],
        )
        .await?;
    if claimed.is_none() {
        return Ok(Done::Rollback(EnqueueOutcome::Duplicate));
    }
    if let Some((group_id, epoch)) = &req.commit {
        let epoch = to_i64(*epoch);
        let accepted = tx
            .query_opt(
                &tx.prepare_cached(
                    "INSERT INTO group_epochs AS g (group_id, last_commit_epoch) VALUES ($1, $2)
                 ON CONFLICT (group_id) DO UPDATE SET last_commit_epoch = excluded.last_commit_epoch
                 WHERE g.last_commit_epoch < excluded.last_commit_epoch
                 RETURNING 1",
                )
                .await?,
                &[&group_id.as_slice(), &epoch],
            )
            .await?;
        if accepted.is_none() {
            let last: i64 = tx
                .query_one(
                    &tx.prepare_cached(
                        "SELECT last_commit_epoch FROM group_epochs WHERE group_id = $1",
                    )
                    .await?,
                    &[&group_id.as_slice()],
                )
                .await?
                .try_get(0)?;
            return Ok(Done::Rollback(EnqueueOutcome::StaleEpoch {
                last_commit_epoch: to_u64(last),
            }));
        }
    }
    let recipients: Vec<&[u8]> = req
        .recipients
        .iter()
        .map(|r| r.as_bytes().as_slice())
        .collect();
    let known: Vec<Vec<u8>> = tx
        .query(
            &tx.prepare_cached("SELECT identity FROM users WHERE identity = ANY($1)")
                .await?,
            &[&recipients],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    if let Some(index) = recipients
        .iter()
        .position(|r| !known.iter().any(|k| k.as_slice() == *r))
    {
        return Ok(Done::Rollback(EnqueueOutcome::UnknownRecipient { index }));
    }
    // Lock every head in one order (sorted), creating missing ones.
    let mut sorted = recipients.clone();
    sorted.sort_unstable();
    tx.execute(
        &tx.prepare_cached(
            "INSERT INTO queue_heads (recipient, next_seq, depth, strangers)
         SELECT r, 1, 0, 0 FROM unnest($1::bytea[]) AS t (r) ORDER BY r
         ON CONFLICT (recipient) DO NOTHING",
        )
        .await?,
        &[&sorted],
    )
    .await?;
    let heads: Vec<(Vec<u8>, Head)> = tx
        .query(
            &tx.prepare_cached(
                "SELECT recipient, next_seq, depth, strangers FROM queue_heads
             WHERE recipient = ANY($1) ORDER BY recipient FOR UPDATE",
            )
            .await?,
            &[&sorted],
        )
        .await?
        .iter()
        .map(|r| {
            Ok((
                r.try_get(0)?,
                Head {
                    next_seq: r.try_get(1)?,
                    depth: r.try_get(2)?,
                    strangers: r.try_get(3)?,
                },
            ))
        })
        .collect::<Result<_, tokio_postgres::Error>>()?;
    let tokens: Vec<TokenRow> = tx
        .query(
            &tx.prepare_cached(
                "SELECT identity, current, previous FROM delivery_tokens WHERE identity = ANY($1)",
            )
            .await?,
            &[&recipients],
        )
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect::<Result<_, tokio_postgres::Error>>()?;
    let mut seqs = Vec::with_capacity(recipients.len());
    let mut stranger_tags: Vec<Option<&[u8]>> = Vec::with_capacity(recipients.len());
    let mut stranger_counts = Vec::with_capacity(recipients.len());
    for (index, r) in recipients.iter().enumerate() {
        let head = heads
            .iter()
            .find(|(k, _)| k.as_slice() == *r)
            .map(|(_, h)| h)
            .ok_or_else(|| StoreError::Corrupt("a locked queue head is missing".into()))?;
        // A recipient without a delivery token has no stranger lane: every
        // message counts alike (clients of wire version 1).
        let presented = req
            .presented
            .get(index)
            .copied()
            .unwrap_or(Presented::Nothing);
        let known = tokens.iter().find(|(k, _, _)| k.as_slice() == *r);
        let stranger = presented.is_stranger(
            known.map(|(_, current, previous)| (current.as_slice(), previous.as_deref())),
        );
        if stranger {
            let mine: i64 = tx
                .query_one(
                    &tx.prepare_cached(
                        "SELECT count(*) FROM queue WHERE recipient = $1 AND stranger = $2",
                    )
                    .await?,
                    &[r, &req.sender_tag.as_slice()],
                )
                .await?
                .try_get(0)?;
            if to_u64(head.strangers) >= req.stranger_depth
                || to_u64(mine) >= req.stranger_per_sender
            {
                return Ok(Done::Rollback(EnqueueOutcome::QueueFull {
                    index,
                    stranger: true,
                }));
            }
        } else if to_u64(head.depth.saturating_sub(head.strangers)) >= req.max_depth {
            return Ok(Done::Rollback(EnqueueOutcome::QueueFull {
                index,
                stranger: false,
            }));
        }
        seqs.push(head.next_seq);
        stranger_tags.push(stranger.then_some(req.sender_tag.as_slice()));
        stranger_counts.push(i64::from(stranger));
    }
    let refs = i32::try_from(recipients.len()).unwrap_or(i32::MAX);
    let payload_id: i64 = tx
        .query_one(
            &tx.prepare_cached("INSERT INTO payloads (refs, data) VALUES ($1, $2) RETURNING id")
                .await?,
            &[&refs, &req.payload.as_slice()],
        )
        .await?
        .try_get(0)?;
    tx.execute(
        &tx.prepare_cached("INSERT INTO queue (recipient, seq, payload_id, message_id, enqueued_at, stranger)
         SELECT r, s, $3, $4, $5, t FROM unnest($1::bytea[], $2::bigint[], $6::bytea[]) AS x (r, s, t)").await?,
        &[
            &recipients,
            &seqs,
            &payload_id,
            &req.message_id.as_slice(),
            &now,
            &stranger_tags,
        ],
    )
    .await?;
    // Advance the heads, and announce each new message to every node
    // (delivered at commit).
    tx.execute(
        &tx.prepare_cached(
            "WITH bumped AS (
             UPDATE queue_heads h SET next_seq = x.s + 1, depth = h.depth + 1,
                 strangers = h.strangers + x.st
             FROM unnest($1::bytea[], $2::bigint[], $3::bigint[]) AS x (r, s, st)
             WHERE h.recipient = x.r
             RETURNING h.recipient, x.s)
         SELECT pg_notify('quicnprotochat_queue', encode(recipient, 'hex') || ':' || s)
         FROM bumped",
        )
        .await?,
        &[&recipients, &seqs, &stranger_counts],
    )
    .await?;
    Ok(Done::Commit(EnqueueOutcome::Stored {
        seqs: seqs.into_iter().map(to_u64).collect(),
    }))
}

async fn ack_tx(
    tx: &deadpool_postgres::Transaction<'_>,
    recipient: &IdentityKey,
    up_to: u64,
) -> Result<Done<u32>, StoreError> {
    let id = recipient.as_bytes().as_slice();
    // The head first, as an enqueue locks it: one lock order.
    tx.query_opt(
        &tx.prepare_cached("SELECT 1 FROM queue_heads WHERE recipient = $1 FOR UPDATE")
            .await?,
        &[&id],
    )
    .await?;
    let removed: Vec<(i64, bool)> = tx
        .query(
            &tx.prepare_cached(
                "DELETE FROM queue WHERE recipient = $1 AND seq <= $2
             RETURNING payload_id, stranger IS NOT NULL",
            )
            .await?,
            &[&id, &to_i64(up_to)],
        )
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, tokio_postgres::Error>>()?;
    if removed.is_empty() {
        return Ok(Done::Rollback(0));
    }
    let strangers = i64::try_from(removed.iter().filter(|(_, s)| *s).count()).unwrap_or(i64::MAX);
    let mut payload_ids: Vec<i64> = removed.iter().map(|(p, _)| *p).collect();
    payload_ids.sort_unstable();
    // Payload rows are shared between recipients: lock them in id order.
    tx.query(
        &tx.prepare_cached("SELECT id FROM payloads WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .await?,
        &[&payload_ids],
    )
    .await?;
    tx.execute(
        &tx.prepare_cached(
            "UPDATE payloads p SET refs = p.refs - c.n
         FROM (SELECT id, count(*)::integer AS n FROM unnest($1::bigint[]) AS u (id) GROUP BY id) c
         WHERE p.id = c.id",
        )
        .await?,
        &[&payload_ids],
    )
    .await?;
    tx.execute(
        &tx.prepare_cached("DELETE FROM payloads WHERE id = ANY($1) AND refs <= 0")
            .await?,
        &[&payload_ids],
    )
    .await?;
    let count = i64::try_from(removed.len()).unwrap_or(i64::MAX);
    tx.execute(
        &tx.prepare_cached(
            "UPDATE queue_heads SET depth = greatest(depth - $2, 0),
             strangers = greatest(strangers - $3, 0)
         WHERE recipient = $1",
        )
        .await?,
        &[&id, &count, &strangers],
    )
    .await?;
    Ok(Done::Commit(u32::try_from(count).unwrap_or(u32::MAX)))
}
