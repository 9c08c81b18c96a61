//! MLS operation costs: quicnprotochat's profile (SQLCipher persistence, one
//! transaction per operation, validation) beside raw openmls doing the same
//! operations in the same run, twice: on openmls's SQLite storage provider
//! (`openmls_sqlite`: a plain, unencrypted SQLite file per member in WAL mode
//! with `synchronous=FULL`, JSON as openmls's own SQLite setup encodes it,
//! one transaction per operation where ours commits one: the like-for-like
//! peer, with the same durability) and on openmls's in-memory storage
//! (`openmls`: the limit, no persistence at all).
//!
//! The `mls_size` group repeats the per-message and per-commit operations
//! in groups of N members (N from `QUICNPROTOCHAT_BENCH_SIZES`, default
//! 2, 8, 32, 128): self-update + process the commit at another member, add
//! one member (commit + Welcome) + merge then remove it + merge (the group
//! stays at N), and encrypt + decrypt 256 bytes.
//! Our groups are built one add at a time (each add commit carries the
//! adder's path); raw openmls groups are built with one commit adding N - 1
//! members; both then self-update `MAX_PAST_EPOCHS` times, so both keep
//! the same window of past N-member epochs (and serialize it on every
//! message), and the same one-member operations are timed on both.
//!
//! The `mls_receive` group decrypts and stores a backlog of 100 messages in
//! one `process_batch` beside raw openmls, and measures the disk's fsync
//! floor in the same run.
//!
//! `cargo bench -p quicnprotochat-core --bench mls`

use std::path::Path;
use std::rc::Rc;

use criterion::{BatchSize, BenchmarkId, Criterion, SamplingMode, criterion_group, criterion_main};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::{OpenMlsRustCrypto, RustCrypto};
use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
use openmls_traits::OpenMlsProvider;
use quicnprotochat_core::group::MAX_PAST_EPOCHS;
use quicnprotochat_core::{CIPHERSUITE, Delivered, Profile, ProfileKey};
use rusqlite::Connection;

/// Ends the benchmark run with a message: a failed step means the figures
/// would be meaningless.
fn fail(what: &str) -> ! {
    eprintln!("benchmark step failed: {what}");
    std::process::exit(1)
}

trait Must<T> {
    fn must(self) -> T;
}

impl<T, E: std::fmt::Debug> Must<T> for Result<T, E> {
    fn must(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => fail(&format!("{e:?}")),
        }
    }
}

impl<T> Must<T> for Option<T> {
    fn must(self) -> T {
        self.unwrap_or_else(|| fail("missing value"))
    }
}

const KEY: ProfileKey = ProfileKey::Raw([7; 32]);

fn profile(dir: &std::path::Path, name: &str) -> Profile {
    Profile::create(&dir.join(name), &KEY, name).must()
}

/// JSON for openmls's SQLite storage, as openmls's own SQLite setup has it
/// (the crate ships no codec).
#[derive(Default)]
struct JsonCodec;

impl Codec for JsonCodec {
    type Error = serde_json::Error;

    fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
        serde_json::to_vec(value)
    }

    fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
        serde_json::from_slice(slice)
    }
}

/// Raw openmls on its SQLite storage provider over a plain SQLite file.
struct SqliteProvider {
    crypto: RustCrypto,
    storage: SqliteStorageProvider<JsonCodec, Rc<Connection>>,
}

impl OpenMlsProvider for SqliteProvider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = SqliteStorageProvider<JsonCodec, Rc<Connection>>;

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

/// A raw openmls member: its provider, keys, and for the SQLite peer its
/// connection (each operation in one transaction on it).
struct Raw<P> {
    provider: P,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
    conn: Option<Rc<Connection>>,
}

impl<P> Raw<P> {
    /// Runs `f` in one transaction when the member persists (`BEGIN
    /// IMMEDIATE` ... `COMMIT`, as ours does), else just runs it.
    fn tx<T>(&self, f: impl FnOnce() -> T) -> T {
        let Some(conn) = &self.conn else {
            return f();
        };
        conn.execute_batch("BEGIN IMMEDIATE").must();
        let out = f();
        conn.execute_batch("COMMIT").must();
        out
    }
}

fn member<P: OpenMlsProvider>(provider: P, conn: Option<Rc<Connection>>, name: &str) -> Raw<P> {
    let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).must();
    let credential = CredentialWithKey {
        credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
        signature_key: signer.public().into(),
    };
    let r = Raw {
        provider,
        signer,
        credential,
        conn,
    };
    r.tx(|| r.signer.store(r.provider.storage()).must());
    r
}

/// Raw openmls on in-memory storage.
fn raw(name: &str) -> Raw<OpenMlsRustCrypto> {
    member(OpenMlsRustCrypto::default(), None, name)
}

/// Raw openmls on SQLite: a fresh plain database file in `dir`, WAL,
/// `synchronous=FULL`, openmls's migrations.
fn raw_sqlite(dir: &Path, name: &str) -> Raw<SqliteProvider> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut conn = Connection::open(dir.join(format!("raw-{name}-{n}.db"))).must();
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
        .must();
    conn.pragma_update(None, "synchronous", "FULL").must();
    SqliteStorageProvider::<JsonCodec, &mut Connection>::new(&mut conn)
        .run_migrations()
        .must();
    let conn = Rc::new(conn);
    let provider = SqliteProvider {
        crypto: RustCrypto::default(),
        storage: SqliteStorageProvider::new(Rc::clone(&conn)),
    };
    member(provider, Some(conn), name)
}

fn raw_kp<P: OpenMlsProvider>(r: &Raw<P>) -> KeyPackage {
    r.tx(|| {
        KeyPackage::builder()
            .build(CIPHERSUITE, &r.provider, &r.signer, r.credential.clone())
            .must()
            .key_package()
            .clone()
    })
}

/// The same group configuration as ours (ratchet tree in the Welcome, the
/// secrets of `MAX_PAST_EPOCHS` past epochs kept), so both sides keep and
/// serialize the same state and the ratio isolates persistence and our
/// bookkeeping.
fn raw_config() -> MlsGroupCreateConfig {
    MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .build()
}

/// `r` creates a group, adds the owner of `kp` and merges: the group and the
/// Welcome.
/// Three transactions on SQLite, as ours: create, add, merge.
fn raw_create_add<P: OpenMlsProvider>(r: &Raw<P>, kp: KeyPackage) -> (MlsGroup, MlsMessageOut) {
    let mut grp =
        r.tx(|| MlsGroup::new(&r.provider, &r.signer, &raw_config(), r.credential.clone()).must());
    let (_c, w, _gi) = r.tx(|| grp.add_members(&r.provider, &r.signer, &[kp]).must());
    r.tx(|| grp.merge_pending_commit(&r.provider).must());
    (grp, w)
}

fn raw_join<P: OpenMlsProvider>(r: &Raw<P>, welcome: MlsMessageOut) -> MlsGroup {
    let bytes = welcome.tls_serialize_detached().must();
    let MlsMessageBodyIn::Welcome(w) = MlsMessageIn::tls_deserialize_exact(&bytes).must().extract()
    else {
        fail("not a welcome")
    };
    let cfg = MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .build();
    r.tx(|| {
        StagedWelcome::new_from_welcome(&r.provider, &cfg, w, None)
            .must()
            .into_group(&r.provider)
            .must()
    })
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().must();
    let mut g = c.benchmark_group("mls");
    g.sample_size(30);

    // Key package: build + store private keys.
    let mut alice = profile(dir.path(), "kp-alice");
    g.bench_function("key_package/ours", |b| {
        b.iter(|| alice.generate_key_packages(1, false, 3600).must())
    });
    let ra = raw("alice");
    g.bench_function("key_package/openmls", |b| b.iter(|| raw_kp(&ra)));
    let sa = raw_sqlite(dir.path(), "alice");
    g.bench_function("key_package/openmls_sqlite", |b| b.iter(|| raw_kp(&sa)));

    // Create a group and add one member (commit + Welcome), merge.
    let bob = profile(dir.path(), "add-bob");
    let mut n = 0u64;
    g.bench_function("create_add_merge/ours", |b| {
        b.iter_batched(
            || {
                n += 1;
                let mut bob = Profile::open(&dir.path().join("add-bob"), &KEY).must();
                (
                    format!("g{n}"),
                    bob.generate_key_packages(1, false, 3600).must().remove(0),
                )
            },
            |(name, kp)| {
                alice.create_group(&name).must();
                let out = alice.add_member(&name, &kp, bob.identity_key()).must();
                alice.confirm_commit(&out.group_id).must();
                out
            },
            BatchSize::PerIteration,
        )
    });
    let rb = raw("bob");
    g.bench_function("create_add_merge/openmls", |b| {
        b.iter_batched(
            || raw_kp(&rb),
            |kp| raw_create_add(&ra, kp).1,
            BatchSize::PerIteration,
        )
    });
    let sb = raw_sqlite(dir.path(), "bob");
    g.bench_function("create_add_merge/openmls_sqlite", |b| {
        b.iter_batched(
            || raw_kp(&sb),
            |kp| raw_create_add(&sa, kp).1,
            BatchSize::PerIteration,
        )
    });

    // Join from a Welcome.
    let mut m = 0u64;
    g.bench_function("join/ours", |b| {
        b.iter_batched(
            || {
                m += 1;
                let mut joiner = profile(dir.path(), &format!("joiner{m}"));
                let kp = joiner
                    .generate_key_packages(1, false, 3600)
                    .must()
                    .remove(0);
                let name = format!("j{m}");
                alice.create_group(&name).must();
                let out = alice.add_member(&name, &kp, joiner.identity_key()).must();
                alice.confirm_commit(&out.group_id).must();
                let w = out.welcome.must();
                let _ = &mut joiner;
                (joiner, w)
            },
            // The profile goes back to criterion, which drops it after the
            // timing: closing the last connection checkpoints the WAL, which
            // is not part of joining.
            |(mut joiner, w)| {
                let events = joiner.process(&w.message_id, &w.payload).must();
                (joiner, events)
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("join/openmls", |b| {
        b.iter_batched(
            || {
                let r = raw("joiner");
                let kp = raw_kp(&r);
                (r, raw_create_add(&ra, kp).1)
            },
            |(r, w)| {
                let group = raw_join(&r, w);
                (r, group)
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("join/openmls_sqlite", |b| {
        b.iter_batched(
            || {
                let r = raw_sqlite(dir.path(), "joiner");
                let kp = raw_kp(&r);
                (r, raw_create_add(&sa, kp).1)
            },
            // As for ours, the member (and its connection) is dropped after
            // the timing.
            |(r, w)| {
                let group = raw_join(&r, w);
                (r, group)
            },
            BatchSize::PerIteration,
        )
    });

    // Encrypt 256 bytes, decrypt at the other member.
    let text = "x".repeat(200);
    let mut bob = bob;
    let kp = bob.generate_key_packages(1, false, 3600).must().remove(0);
    alice.create_group("chat").must();
    let out = alice.add_member("chat", &kp, bob.identity_key()).must();
    alice.confirm_commit(&out.group_id).must();
    let w = out.welcome.must();
    bob.process(&w.message_id, &w.payload).must();
    g.bench_function("encrypt_decrypt_256B/ours", |b| {
        b.iter(|| {
            let out = alice.send_text("chat", &text).must();
            bob.process(&out.message_id, &out.payload).must()
        })
    });
    let (mut ga, w) = raw_create_add(&ra, raw_kp(&rb));
    let mut gb = raw_join(&rb, w);
    let payload = vec![b'x'; 256];
    g.bench_function("encrypt_decrypt_256B/openmls", |b| {
        b.iter(|| raw_encrypt_decrypt(&ra, &rb, &mut ga, &mut gb, &payload))
    });
    let (mut sga, w) = raw_create_add(&sa, raw_kp(&sb));
    let mut sgb = raw_join(&sb, w);
    g.bench_function("encrypt_decrypt_256B/openmls_sqlite", |b| {
        b.iter(|| raw_encrypt_decrypt(&sa, &sb, &mut sga, &mut sgb, &payload))
    });
    g.finish();
}

/// `ra`'s member encrypts `payload` (one transaction), `rb`'s decrypts it
/// (another).
fn raw_encrypt_decrypt<P: OpenMlsProvider>(
    ra: &Raw<P>,
    rb: &Raw<P>,
    ga: &mut MlsGroup,
    gb: &mut MlsGroup,
    payload: &[u8],
) -> ProcessedMessage {
    let out = ra.tx(|| ga.create_message(&ra.provider, &ra.signer, payload).must());
    let pm = to_protocol(&out);
    rb.tx(|| gb.process_message(&rb.provider, pm).must())
}

/// Group sizes of `mls_size`.
fn sizes() -> Vec<usize> {
    std::env::var("QUICNPROTOCHAT_BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![2, 8, 32, 128])
}

/// Our group of `n` members: alice (the creator), bob (joined first, he
/// processes every later commit) and n - 2 others who never join.
fn our_group(dir: &std::path::Path, n: usize) -> (Profile, Profile) {
    let mut alice = profile(dir, &format!("size{n}-alice"));
    let mut bob = profile(dir, &format!("size{n}-bob"));
    alice.create_group("g").must();
    let kp = bob.generate_key_packages(1, false, 3600).must().remove(0);
    let out = alice.add_member("g", &kp, bob.identity_key()).must();
    alice.confirm_commit(&out.group_id).must();
    let w = out.welcome.must();
    bob.process(&w.message_id, &w.payload).must();
    for i in 2..n {
        let mut m = profile(dir, &format!("size{n}-m{i}"));
        let kp = m.generate_key_packages(1, false, 3600).must().remove(0);
        let out = alice.add_member("g", &kp, m.identity_key()).must();
        alice.confirm_commit(&out.group_id).must();
        let c = out.commit.must();
        bob.process(&c.message_id, &c.payload).must();
    }
    // Fill the window of past epochs with N-member epochs, as in raw_group.
    for _ in 0..MAX_PAST_EPOCHS {
        our_self_update(&mut alice, &mut bob);
    }
    (alice, bob)
}

/// A raw openmls group of `n` members: ra's group and rb's copy.
fn raw_group<P: OpenMlsProvider>(ra: &Raw<P>, rb: &Raw<P>, n: usize) -> (MlsGroup, MlsGroup) {
    let mut ga = ra.tx(|| {
        MlsGroup::new(
            &ra.provider,
            &ra.signer,
            &raw_config(),
            ra.credential.clone(),
        )
        .must()
    });
    let mut kps = vec![raw_kp(rb)];
    for i in 2..n {
        kps.push(raw_kp(&raw(&format!("m{i}"))));
    }
    let (_c, w, _gi) = ra.tx(|| ga.add_members(&ra.provider, &ra.signer, &kps).must());
    ra.tx(|| ga.merge_pending_commit(&ra.provider).must());
    let mut gb = raw_join(rb, w);
    // Fill the window of past epochs with N-member epochs, as in our_group.
    for _ in 0..MAX_PAST_EPOCHS {
        raw_self_update(ra, rb, &mut ga, &mut gb);
    }
    (ga, gb)
}

/// ra's member commits a self-update and merges it (two transactions, as
/// ours: the commit, then its confirmation); rb processes and merges it (one).
fn raw_self_update<P: OpenMlsProvider>(
    ra: &Raw<P>,
    rb: &Raw<P>,
    ga: &mut MlsGroup,
    gb: &mut MlsGroup,
) {
    let bundle = ra.tx(|| {
        ga.self_update(&ra.provider, &ra.signer, LeafNodeParameters::default())
            .must()
    });
    ra.tx(|| ga.merge_pending_commit(&ra.provider).must());
    let (commit, _w, _gi) = bundle.into_contents();
    rb.tx(|| {
        let pm = gb
            .process_message(&rb.provider, to_protocol(&commit))
            .must();
        if let ProcessedMessageContent::StagedCommitMessage(sc) = pm.into_content() {
            gb.merge_staged_commit(&rb.provider, *sc).must();
        }
    });
}

/// Adds one member and merges, then removes it and merges: four
/// transactions, as ours (each commit, each confirmation).
fn raw_add_remove<P: OpenMlsProvider>(
    ra: &Raw<P>,
    ga: &mut MlsGroup,
    kp: KeyPackage,
) -> MlsMessageOut {
    let sig = kp.leaf_node().signature_key().as_slice().to_vec();
    let (_c, w, _gi) = ra.tx(|| ga.add_members(&ra.provider, &ra.signer, &[kp]).must());
    ra.tx(|| ga.merge_pending_commit(&ra.provider).must());
    let idx = ga.members().find(|m| m.signature_key == sig).must().index;
    ra.tx(|| ga.remove_members(&ra.provider, &ra.signer, &[idx]).must());
    ra.tx(|| ga.merge_pending_commit(&ra.provider).must());
    w
}

/// alice commits a self-update (accepted); bob processes it.
fn our_self_update(alice: &mut Profile, bob: &mut Profile) {
    let out = alice.self_update("g").must();
    alice.confirm_commit(&out.group_id).must();
    let c = out.commit.must();
    bob.process(&c.message_id, &c.payload).must();
}

fn to_protocol(out: &MlsMessageOut) -> ProtocolMessage {
    let bytes = out.tls_serialize_detached().must();
    MlsMessageIn::tls_deserialize_exact(&bytes)
        .must()
        .try_into_protocol_message()
        .must()
}

fn bench_sizes(c: &mut Criterion) {
    let dir = tempfile::tempdir().must();
    let mut g = c.benchmark_group("mls_size");
    // Iterations of up to ~0.2 s at N = 512: one iteration per sample
    // (criterion's default linear sampling would run 55 per benchmark).
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.warm_up_time(std::time::Duration::from_millis(500));
    g.measurement_time(std::time::Duration::from_secs(2));
    let text = "x".repeat(200);
    let payload = vec![b'x'; 256];
    for n in sizes() {
        let n = n.max(2);
        let (mut alice, mut bob) = our_group(dir.path(), n);
        let ra = raw(&format!("alice{n}"));
        let rb = raw(&format!("bob{n}"));
        let (mut ga, mut gb) = raw_group(&ra, &rb, n);
        let sa = raw_sqlite(dir.path(), &format!("alice{n}"));
        let sb = raw_sqlite(dir.path(), &format!("bob{n}"));
        let (mut sga, mut sgb) = raw_group(&sa, &sb, n);

        g.bench_function(BenchmarkId::new("self_update_process/ours", n), |b| {
            b.iter(|| our_self_update(&mut alice, &mut bob))
        });
        g.bench_function(BenchmarkId::new("self_update_process/openmls", n), |b| {
            b.iter(|| raw_self_update(&ra, &rb, &mut ga, &mut gb))
        });
        g.bench_function(
            BenchmarkId::new("self_update_process/openmls_sqlite", n),
            |b| b.iter(|| raw_self_update(&sa, &sb, &mut sga, &mut sgb)),
        );

        g.bench_function(BenchmarkId::new("encrypt_decrypt_256B/ours", n), |b| {
            b.iter(|| {
                let out = alice.send_text("g", &text).must();
                bob.process(&out.message_id, &out.payload).must()
            })
        });
        g.bench_function(BenchmarkId::new("encrypt_decrypt_256B/openmls", n), |b| {
            b.iter(|| raw_encrypt_decrypt(&ra, &rb, &mut ga, &mut gb, &payload))
        });
        g.bench_function(
            BenchmarkId::new("encrypt_decrypt_256B/openmls_sqlite", n),
            |b| b.iter(|| raw_encrypt_decrypt(&sa, &sb, &mut sga, &mut sgb, &payload)),
        );

        // Add one member (commit + Welcome) and merge, then remove it and
        // merge: the group stays at N members across iterations.
        let mut k = 0u64;
        g.bench_function(BenchmarkId::new("add_remove/ours", n), |b| {
            b.iter_batched(
                || {
                    k += 1;
                    let name = format!("size{n}-add{k}");
                    let mut m = profile(dir.path(), &name);
                    let kp = m.generate_key_packages(1, false, 3600).must().remove(0);
                    (kp, m.identity_key(), name)
                },
                |(kp, id, name)| {
                    let out = alice.add_member("g", &kp, id).must();
                    alice.confirm_commit(&out.group_id).must();
                    let out = alice.remove_member("g", &name).must();
                    alice.confirm_commit(&out.group_id).must();
                    out
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function(BenchmarkId::new("add_remove/openmls", n), |b| {
            b.iter_batched(
                || raw_kp(&raw("added")),
                |kp| raw_add_remove(&ra, &mut ga, kp),
                BatchSize::PerIteration,
            )
        });
        g.bench_function(BenchmarkId::new("add_remove/openmls_sqlite", n), |b| {
            b.iter_batched(
                || raw_kp(&raw("added")),
                |kp| raw_add_remove(&sa, &mut sga, kp),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

/// Messages per batch in `mls_receive`.
const BATCH: usize = 100;

/// Receiving a backlog: `BATCH` application messages decrypted and stored
/// with one `process_batch` (one transaction, one fsync) against raw openmls
/// processing the same number; and the disk's fsync floor, the least any
/// durable operation costs here (one 4 KiB block overwritten and
/// `fdatasync`ed in the same temporary directory), so a per-operation figure
/// can be read against what persistence alone costs.
fn bench_receive(c: &mut Criterion) {
    use std::os::unix::fs::FileExt as _;
    let dir = tempfile::tempdir().must();
    let mut g = c.benchmark_group("mls_receive");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.warm_up_time(std::time::Duration::from_millis(500));
    g.measurement_time(std::time::Duration::from_secs(3));
    let file = std::fs::File::create(dir.path().join("fsync-floor")).must();
    g.bench_function("fsync_floor", |b| {
        b.iter(|| {
            file.write_all_at(&[0xA5; 4096], 0).must();
            file.sync_data().must();
        })
    });

    g.throughput(criterion::Throughput::Elements(BATCH as u64));
    let (mut alice, mut bob) = our_group(dir.path(), 2);
    let text = "x".repeat(200);
    let mut seq = 0u64;
    g.bench_function(BenchmarkId::new("process_batch/ours", BATCH), |b| {
        b.iter_batched(
            || {
                (0..BATCH)
                    .map(|_| alice.send_text("g", &text).must())
                    .collect::<Vec<_>>()
            },
            |msgs| {
                let batch: Vec<Delivered<'_>> = msgs
                    .iter()
                    .map(|m| {
                        seq += 1;
                        Delivered {
                            seq,
                            message_id: &m.message_id,
                            payload: &m.payload,
                        }
                    })
                    .collect();
                let results = bob.process_batch(&batch).must();
                if results.iter().any(Result::is_err) {
                    fail("a message of the batch was rejected");
                }
            },
            BatchSize::PerIteration,
        )
    });
    let ra = raw("alice-recv");
    let rb = raw("bob-recv");
    let (mut ga, mut gb) = raw_group(&ra, &rb, 2);
    let payload = vec![b'x'; 256];
    g.bench_function(BenchmarkId::new("process_batch/openmls", BATCH), |b| {
        b.iter_batched(
            || {
                (0..BATCH)
                    .map(|_| {
                        to_protocol(&ga.create_message(&ra.provider, &ra.signer, &payload).must())
                    })
                    .collect::<Vec<_>>()
            },
            |msgs| {
                for pm in msgs {
                    gb.process_message(&rb.provider, pm).must();
                }
            },
            BatchSize::PerIteration,
        )
    });
    // The batch in one transaction, as ours.
    let sa = raw_sqlite(dir.path(), "alice-recv");
    let sb = raw_sqlite(dir.path(), "bob-recv");
    let (mut sga, mut sgb) = raw_group(&sa, &sb, 2);
    g.bench_function(
        BenchmarkId::new("process_batch/openmls_sqlite", BATCH),
        |b| {
            b.iter_batched(
                || {
                    (0..BATCH)
                        .map(|_| {
                            let out = sa.tx(|| {
                                sga.create_message(&sa.provider, &sa.signer, &payload)
                                    .must()
                            });
                            to_protocol(&out)
                        })
                        .collect::<Vec<_>>()
                },
                |msgs| {
                    sb.tx(|| {
                        for pm in msgs {
                            sgb.process_message(&sb.provider, pm).must();
                        }
                    })
                },
                BatchSize::PerIteration,
            )
        },
    );
    g.finish();
}

criterion_group!(benches, bench, bench_sizes, bench_receive);
criterion_main!(benches);
