//! The delivery service's store against its floors, measured in one run on
//! the same disk:
//!
//! - `fsync_floor`: overwrite one 4 KiB block of a file and `fdatasync` it
//!   (what a WAL commit does once the log is recycled), the least a durable
//!   commit can cost on this disk;
//! - `raw_sqlite`: one 256-byte row inserted in its own WAL transaction with
//!   `synchronous=FULL` by plain rusqlite on one connection (no key, no
//!   threads, no bookkeeping), the least a durable SQLite commit costs;
//! - `plain_store`: our store (writer thread, group commit, dedup keys,
//!   per-recipient sequence numbers, payload reference counts) on an
//!   unencrypted database;
//! - `sqlcipher_store`: the same store as the server runs it (SQLCipher).
//!
//! Scenarios: one enqueue at a time (latency bound: one commit each), 64
//! enqueues in flight (group commit: one commit for many), the same 64 as
//! one batch (`sqlcipher_store_batch`: one `enqueueBatch`, one job), and
//! fetching 100 queued messages.  Run: `cargo bench -p quicnprotochat-server --bench store`.

use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use quicnprotochat_core::IdentityKey;
use quicnprotochat_server::store::sqlite::{DbKey, SqliteOptions, SqliteStore};
use quicnprotochat_server::store::{EnqueueOutcome, EnqueueRequest, Presented, Store};

/// Ends the run: a failed step would make the figures meaningless.
fn fail(what: &str) -> ! {
    eprintln!("benchmark step failed: {what}");
    std::process::exit(1)
}

trait Must<T> {
    fn must(self) -> T;
}

impl<T, E: std::fmt::Debug> Must<T> for Result<T, E> {
    fn must(self) -> T {
        self.unwrap_or_else(|e| fail(&format!("{e:?}")))
    }
}

impl<T> Must<T> for Option<T> {
    fn must(self) -> T {
        self.unwrap_or_else(|| fail("missing value"))
    }
}

const PAYLOAD: usize = 256;
const IN_FLIGHT: usize = 64;
const FETCH: u32 = 100;

fn key(n: u8) -> IdentityKey {
    IdentityKey::from_slice(&[n; 32]).must()
}

struct Bench {
    rt: tokio::runtime::Runtime,
    store: SqliteStore,
    next: AtomicU64,
}

impl Bench {
    fn open(dir: &Path, db_key: DbKey) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .must();
        std::fs::create_dir_all(dir).must();
        let store = SqliteStore::open(SqliteOptions::new(dir.join("store.db"), db_key)).must();
        rt.block_on(async {
            store.register("sender".into(), key(1)).await.must();
            store.register("recipient".into(), key(2)).await.must();
        });
        Self {
            rt,
            store,
            next: AtomicU64::new(0),
        }
    }

    fn request(&self) -> EnqueueRequest {
        // As the server sees them: ids as clients make them (time first),
        // SHA-256(sender || id) beside them.
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let message_id =
            quicnprotochat_core::new_message_id(&quicnprotochat_core::clock::SystemClock::new())
                .must();
        let mut dedup_key = [0u8; 32];
        dedup_key.copy_from_slice(
            ring::digest::digest(&ring::digest::SHA256, &n.to_le_bytes()).as_ref(),
        );
        EnqueueRequest {
            recipients: vec![key(2)],
            message_id,
            dedup_key,
            payload: vec![0xA5; PAYLOAD],
            now_ms: 1_800_000_000_000,
            max_depth: u64::MAX,
            dedup_window_ms: 86_400_000,
            commit: None,
            presented: vec![Presented::Nothing],
            sender_tag: [0; 16],
            stranger_depth: u64::MAX,
            stranger_per_sender: u64::MAX,
        }
    }

    async fn enqueue(&self) {
        let out = self.store.enqueue(self.request()).await.must();
        if !matches!(out, EnqueueOutcome::Stored { .. }) {
            fail(&format!("{out:?}"));
        }
    }

    fn one(&self) {
        self.rt.block_on(self.enqueue());
    }

    fn many(&self) {
        self.rt.block_on(futures::future::join_all(
            (0..IN_FLIGHT).map(|_| self.enqueue()),
        ));
    }

    /// `IN_FLIGHT` enqueues as one batch (`enqueueBatch`'s path).
    fn batch(&self) {
        let requests = (0..IN_FLIGHT).map(|_| self.request()).collect();
        let outcomes = self.rt.block_on(self.store.enqueue_batch(requests)).must();
        if outcomes.len() != IN_FLIGHT
            || !outcomes
                .iter()
                .all(|o| matches!(o, Ok(EnqueueOutcome::Stored { .. })))
        {
            fail("a batch was not stored whole");
        }
    }

    /// Queues `FETCH` messages and returns the first sequence number.
    fn fill(&self) -> u64 {
        self.rt.block_on(async {
            let mut first = None;
            for _ in 0..FETCH {
                match self.store.enqueue(self.request()).await.must() {
                    EnqueueOutcome::Stored { seqs } => {
                        first.get_or_insert(seqs[0]);
                    }
                    other => fail(&format!("{other:?}")),
                }
            }
            first.must()
        })
    }

    fn fetch(&self, from: u64) {
        let got = self
            .rt
            .block_on(self.store.fetch(key(2), from, FETCH, usize::MAX))
            .must();
        if got.len() != FETCH as usize {
            fail("short fetch");
        }
    }
}

/// Plain rusqlite: the least a durable SQLite insert costs.
fn raw_sqlite(dir: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.join("raw.db")).must();
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
        .must();
    conn.pragma_update(None, "synchronous", "FULL").must();
    conn.execute_batch("CREATE TABLE q (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        .must();
    conn
}

fn raw_insert(conn: &mut rusqlite::Connection, rows: usize) {
    let tx = conn.transaction().must();
    {
        let mut stmt = tx
            .prepare_cached("INSERT INTO q (payload) VALUES (?1)")
            .must();
        for _ in 0..rows {
            stmt.execute([&[0xA5u8; PAYLOAD][..]]).must();
        }
    }
    tx.commit().must();
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().must();
    let sqlcipher = Bench::open(&dir.path().join("sqlcipher"), DbKey::Raw([7; 32]));
    let plain = Bench::open(&dir.path().join("plain"), DbKey::Unencrypted);
    let mut raw = raw_sqlite(dir.path());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.path().join("fsync.log"))
        .must();

    let mut g = c.benchmark_group("store_enqueue_1");
    g.throughput(Throughput::Elements(1));
    g.bench_function("fsync_floor", |b| {
        b.iter(|| {
            file.write_all_at(&[0xA5; 4096], 0).must();
            file.sync_data().must();
        })
    });
    g.bench_function("raw_sqlite", |b| b.iter(|| raw_insert(&mut raw, 1)));
    g.bench_function("plain_store", |b| b.iter(|| plain.one()));
    g.bench_function("sqlcipher_store", |b| b.iter(|| sqlcipher.one()));
    g.finish();

    let mut g = c.benchmark_group("store_enqueue_64");
    g.throughput(Throughput::Elements(IN_FLIGHT as u64));
    g.bench_function("raw_sqlite", |b| b.iter(|| raw_insert(&mut raw, IN_FLIGHT)));
    g.bench_function("plain_store", |b| b.iter(|| plain.many()));
    g.bench_function("sqlcipher_store", |b| b.iter(|| sqlcipher.many()));
    g.bench_function("sqlcipher_store_batch", |b| b.iter(|| sqlcipher.batch()));
    g.finish();

    let mut g = c.benchmark_group("store_fetch_100");
    g.throughput(Throughput::Elements(u64::from(FETCH)));
    let (p0, s0) = (plain.fill(), sqlcipher.fill());
    g.bench_function("plain_store", |b| {
        b.iter_batched(|| p0, |from| plain.fetch(from), BatchSize::SmallInput)
    });
    g.bench_function("sqlcipher_store", |b| {
        b.iter_batched(|| s0, |from| sqlcipher.fetch(from), BatchSize::SmallInput)
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
