//! Re-keying the real binary's database, and the data directory's lock:
//! after `rekey` the database opens under the new key only and serves what
//! it held; a `kill -9` at any instant of a re-key leaves a database that
//! opens under exactly one of the two keys with every message; `restore`
//! and `rekey` refuse to run under a live server.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quicnprotochat_client::harness::{ServerProcess, message_texts};
use quicnprotochat_core::IdentityKey;
use quicnprotochat_server::store::sqlite::{DB_FILE_NAME, DbKey, SqliteOptions, SqliteStore};
use quicnprotochat_server::store::{EnqueueRequest, Presented, Store, StoreError};

const BIN: &str = env!("CARGO_BIN_EXE_quicnprotochat-server");

/// Two keys that production mode accepts (not one repeated byte).
const OLD_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const NEW_KEY: &str = "f0e1d2c3b4a5968778695a4b3c2d1e0ff0e1d2c3b4a5968778695a4b3c2d1e0f";

fn raw(hex_key: &str) -> DbKey {
    DbKey::Raw(hex::decode(hex_key).unwrap().try_into().unwrap())
}

fn write_key_file(dir: &Path, name: &str, hex_key: &str) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut f, format!("{hex_key}\n").as_bytes()).unwrap();
    path
}

fn output(mut cmd: Command) -> (bool, String) {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn after_a_rekey_the_server_starts_only_under_the_new_key_and_serves_old_messages() {
    let mut server =
        ServerProcess::start_with_env(BIN, &[("QUICNPROTOCHAT_DB_KEY", OLD_KEY)]).unwrap();
    let alice = server.messenger("alice").await.unwrap();
    let bob = server.messenger("bob").await.unwrap();
    alice.create_group("g").await.unwrap();
    alice.invite("g", "bob").await.unwrap();
    bob.sync().await.unwrap();
    alice.send("g", "m1").await.unwrap();
    alice.send("g", "m2").await.unwrap();
    let key_file = write_key_file(server.temp_dir(), "new.key", NEW_KEY);
    let key_arg = key_file.to_str().unwrap();

    // A second server on the same data directory refuses to start.
    let (ok, said) = output({
        let mut c = server.command();
        c.args(["serve", "--listen", "127.0.0.1:0"]);
        c
    });
    assert!(
        !ok && said.contains("in use") && said.contains("(serve)"),
        "{said}"
    );
    // Under the running server both replacing commands refuse, and
    // change nothing.
    let (ok, said) = output({
        let mut c = server.command();
        c.args(["rekey", "--new-key-file", key_arg]);
        c
    });
    assert!(!ok && said.contains("in use"), "{said}");
    assert!(!said.contains(NEW_KEY) && !said.contains(OLD_KEY), "{said}");
    let backup = server.temp_dir().join("backup.db");
    let (ok, said) = output({
        let mut c = server.command();
        c.args(["backup", "--to", backup.to_str().unwrap()]);
        c
    });
    assert!(ok, "backup runs beside the server: {said}");
    let (ok, said) = output({
        let mut c = server.command();
        c.args(["restore", "--from", backup.to_str().unwrap()]);
        c
    });
    assert!(!ok && said.contains("in use"), "{said}");
    assert!(
        !server
            .data_dir()
            .join(format!("{DB_FILE_NAME}.restoring"))
            .exists(),
        "a refused restore leaves nothing behind"
    );

    drop((alice, bob));
    server.kill();
    let (ok, said) = output({
        let mut c = server.command();
        c.args(["rekey", "--new-key-file", key_arg]);
        c
    });
    assert!(ok, "{said}");
    assert!(said.contains("re-keyed"), "{said}");
    assert!(!said.contains(NEW_KEY) && !said.contains(OLD_KEY), "{said}");
    assert!(
        !server
            .data_dir()
            .join(format!("{DB_FILE_NAME}.rekeying"))
            .exists()
    );
    // The configured (old) key no longer opens it: a second run fails.
    let (ok, said) = output({
        let mut c = server.command();
        c.args(["rekey", "--new-key-file", key_arg]);
        c
    });
    assert!(!ok && said.contains("does not open"), "{said}");

    assert!(
        server.restart().is_err(),
        "the server must not start under the old key"
    );
    server.set_env("QUICNPROTOCHAT_DB_KEY", NEW_KEY);
    server.restart().unwrap();
    let bob = server.reopen_messenger("bob").await.unwrap();
    assert_eq!(message_texts(bob.sync().await.unwrap()), ["m1", "m2"]);
    let alice = server.reopen_messenger("alice").await.unwrap();
    alice.send("g", "m3").await.unwrap();
    assert_eq!(message_texts(bob.sync().await.unwrap()), ["m3"]);
}

#[test]
fn rekey_refuses_a_weak_new_key_in_production_a_bad_key_file_and_postgresql() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let weak = write_key_file(dir.path(), "weak.key", &"00".repeat(32));
    let run = |mode: &str, key_file: &Path| {
        let mut c = Command::new(BIN);
        c.env_clear()
            .env("QUICNPROTOCHAT_DATA_DIR", &data)
            .env("QUICNPROTOCHAT_DB_KEY", OLD_KEY)
            .env("QUICNPROTOCHAT_MODE", mode)
            .args(["rekey", "--new-key-file"])
            .arg(key_file);
        output(c)
    };
    let (ok, said) = run("production", &weak);
    assert!(!ok && said.contains("repeated byte"), "{said}");
    let garbage = dir.path().join("garbage.key");
    std::fs::write(&garbage, "not-a-key-secret-value").unwrap();
    let (ok, said) = run("development", &garbage);
    assert!(!ok && said.contains("64 hexadecimal"), "{said}");
    assert!(!said.contains("not-a-key-secret-value"), "{said}");
    // PostgreSQL has no SQLCipher file to re-key.
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("QUICNPROTOCHAT_DATA_DIR", &data)
        .env(
            "QUICNPROTOCHAT_DATABASE_URL",
            "host=/nonexistent dbname=none",
        )
        .args(["rekey", "--new-key-file"])
        .arg(&weak);
    let (ok, said) = output(c);
    assert!(
        !ok && said.contains("works on the embedded database"),
        "{said}"
    );
}

fn ident(i: u32) -> IdentityKey {
    let mut k = [0x5a; 32];
    k[..4].copy_from_slice(&i.to_be_bytes());
    IdentityKey(k)
}

/// Recipients and messages each of the store the kill test re-keys.
const RECIPIENTS: u32 = 20;
const MESSAGES_EACH: u32 = 1_000;
const PAYLOAD_BYTES: usize = 256;

fn payload(recipient: u32, n: u32) -> Vec<u8> {
    let mut p = vec![0u8; PAYLOAD_BYTES];
    p[..4].copy_from_slice(&recipient.to_be_bytes());
    p[4..8].copy_from_slice(&n.to_be_bytes());
    for (i, b) in p.iter_mut().enumerate().skip(8) {
        *b = u8::try_from((i + n as usize) % 251).unwrap();
    }
    p
}

fn request(recipient: u32, n: u32) -> EnqueueRequest {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&recipient.to_be_bytes());
    id[4..8].copy_from_slice(&n.to_be_bytes());
    let mut dedup = [0u8; 32];
    dedup[..16].copy_from_slice(&id);
    EnqueueRequest {
        recipients: vec![ident(recipient)],
        message_id: id,
        dedup_key: dedup,
        payload: payload(recipient, n),
        now_ms: 1_000,
        max_depth: 1_000_000,
        dedup_window_ms: 60_000,
        commit: None,
        presented: vec![Presented::Own],
        sender_tag: [0; 16],
        stranger_depth: 1_000,
        stranger_per_sender: 100,
    }
}

/// A closed store under `key` with `RECIPIENTS` x `MESSAGES_EACH` queued
/// messages, filled through the store API.
async fn fill(path: &Path, key: DbKey) {
    let store = Arc::new(SqliteStore::open(SqliteOptions::new(path, key)).unwrap());
    for r in 0..RECIPIENTS {
        store.register(format!("user{r}"), ident(r)).await.unwrap();
    }
    for n in 0..MESSAGES_EACH {
        let sends: Vec<_> = (0..RECIPIENTS)
            .map(|r| {
                let s = store.clone();
                tokio::spawn(async move { s.enqueue(request(r, n)).await })
            })
            .collect();
        for s in sends {
            s.await.unwrap().unwrap();
        }
    }
    Arc::try_unwrap(store).ok().unwrap().close();
}

/// Whether the database at `path` opens under `key`, and if so, that it
/// holds every message of [`fill`], in order.
async fn opens_with_everything(path: &Path, key: DbKey) -> bool {
    let store = match SqliteStore::open(SqliteOptions::new(path, key)) {
        Ok(s) => s,
        Err(StoreError::WrongKey { .. }) => return false,
        Err(e) => panic!("the database neither opens nor is under another key: {e}"),
    };
    assert_eq!(store.integrity_check().await.unwrap(), None);
    for r in 0..RECIPIENTS {
        let got = store
            .fetch(ident(r), 0, u32::MAX, usize::MAX)
            .await
            .unwrap();
        assert_eq!(got.len(), MESSAGES_EACH as usize, "queue {r}");
        for (n, m) in (0..MESSAGES_EACH).zip(&got) {
            assert_eq!(m.payload, payload(r, n), "queue {r} message {n}");
        }
    }
    store.close();
    true
}

fn rekey_command(data: &Path, key_file: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("QUICNPROTOCHAT_DATA_DIR", data)
        .env("QUICNPROTOCHAT_DB_KEY", OLD_KEY)
        .env("QUICNPROTOCHAT_NEW_DB_KEY_FILE", key_file)
        .arg("rekey")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// A fresh data directory holding a copy of `pristine`.
fn copy_of(root: &Path, name: &str, pristine: &Path) -> PathBuf {
    let data = root.join(name);
    std::fs::create_dir(&data).unwrap();
    std::fs::copy(pristine, data.join(DB_FILE_NAME)).unwrap();
    data
}

#[tokio::test]
async fn a_rekey_killed_at_any_point_leaves_the_database_under_exactly_one_key_and_complete() {
    let root = tempfile::tempdir().unwrap();
    let pristine = root.path().join("pristine.db");
    fill(&pristine, raw(OLD_KEY)).await;
    let key_file = write_key_file(root.path(), "new.key", NEW_KEY);

    // One uninterrupted run: how long a re-key of this store takes.
    let data = copy_of(root.path(), "whole", &pristine);
    let began = Instant::now();
    let status = rekey_command(&data, &key_file).status().unwrap();
    let whole = began.elapsed();
    assert!(status.success());
    assert!(!opens_with_everything(&data.join(DB_FILE_NAME), raw(OLD_KEY)).await);
    assert!(opens_with_everything(&data.join(DB_FILE_NAME), raw(NEW_KEY)).await);

    // Killed at points spread over that time (and a little past it, where
    // the rename and the directory sync are).
    const POINTS: u32 = 8;
    let (mut old, mut new) = (0, 0);
    for i in 0..POINTS {
        let data = copy_of(root.path(), &format!("killed-{i}"), &pristine);
        let mut child = rekey_command(&data, &key_file).spawn().unwrap();
        let delay = whole.mul_f64(f64::from(i + 1) / f64::from(POINTS) * 1.1);
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        let db = data.join(DB_FILE_NAME);
        let under_old = opens_with_everything(&db, raw(OLD_KEY)).await;
        let under_new = opens_with_everything(&db, raw(NEW_KEY)).await;
        assert!(
            under_old != under_new,
            "killed after {delay:?}: opens under the old key {under_old}, the new key {under_new}"
        );
        if under_old {
            old += 1;
            // An interrupted re-key is simply run again.
            assert!(rekey_command(&data, &key_file).status().unwrap().success());
            assert!(opens_with_everything(&db, raw(NEW_KEY)).await);
        } else {
            new += 1;
        }
    }
    eprintln!(
        "re-key of the test store took {whole:?}; killed {POINTS} times: {old} under the old key, {new} under the new"
    );
    assert!(whole < Duration::from_secs(120));
}
