//! Profiles written by an earlier release open, migrate and keep working.
//!
//! `fixtures/profiles-v9` holds three profiles (schema version 9, MLS state
//! as openmls's SQLite storage with JSON values, as releases up to then
//! wrote it), written by `write_release_fixture` below with the release's
//! code: alice, bob and carol in group "g" after a few messages each way
//! and a self-update by bob; carol's message "sent before the upgrade" not
//! delivered yet (`carol-msg.id`, `carol-msg.bin`), and one key package of
//! bob's not used yet (kept in his profile).  The tests work on copies.
//!
//! Schema 10 keeps keys as they were, writes values compactly and message
//! secrets stores in pieces; the migration rewrites the group state in one
//! transaction (`profile/db.rs` tests a migration that fails half-way).

use std::path::{Path, PathBuf};

use quicnprotochat_core::sqlcipher::{self, Opened};
use quicnprotochat_core::{CommitOutcome, Event, Outgoing, Profile, ProfileKey};

const NAMES: [&str; 3] = ["alice", "bob", "carol"];

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/profiles-v9")
}

/// The passphrase of each fixture profile.
fn key(name: &str) -> ProfileKey {
    ProfileKey::Passphrase(format!("fixture-passphrase-{name}"))
}

/// A copy of the fixture profiles in a temporary directory.
fn copy_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture_dir()).unwrap() {
        let entry = entry.unwrap();
        let to = dir.path().join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir(&to).unwrap();
            for f in std::fs::read_dir(entry.path()).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
    dir
}

fn open(dir: &Path, name: &str) -> Profile {
    Profile::open(&dir.join(name), &key(name)).unwrap()
}

/// The raw connection to a profile's database (for what the API does not
/// show: the schema version and how values are stored).
fn raw_db(dir: &Path, name: &str) -> rusqlite::Connection {
    let path = dir
        .join(name)
        .join(quicnprotochat_core::profile::STATE_FILE);
    match sqlcipher::open_keyed(
        &path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        &format!("fixture-passphrase-{name}"),
    )
    .unwrap()
    {
        Opened::Open(conn, _) => conn,
        other => panic!("{name}: {other:?}"),
    }
}

fn user_version(dir: &Path, name: &str) -> i64 {
    raw_db(dir, name)
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

/// Every key column of openmls's tables, as earlier releases encoded keys:
/// JSON.
const KEY_COLUMNS: [(&str, &str); 8] = [
    ("openmls_group_data", "group_id"),
    ("openmls_own_leaf_nodes", "group_id"),
    ("openmls_proposals", "group_id"),
    ("openmls_proposals", "proposal_ref"),
    ("openmls_signature_keys", "public_key"),
    ("openmls_encryption_keys", "public_key"),
    ("openmls_key_packages", "key_package_ref"),
    ("openmls_epoch_keys_pairs", "group_id"),
];

/// How a profile's MLS state is stored after the migration: schema 10;
/// keys still JSON (so rows of earlier releases are found); the group
/// state in the compact encoding (first byte 0xC0) but the join
/// configuration (JSON); message secrets stores in pieces only.
fn assert_migrated(dir: &Path, name: &str) {
    let db = raw_db(dir, name);
    let version: i64 = db
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 10, "{name}");
    for (table, column) in KEY_COLUMNS {
        let keys: Vec<Vec<u8>> = db
            .prepare(&format!("SELECT {column} FROM {table}"))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for k in keys {
            serde_json::from_slice::<serde_json::Value>(&k)
                .unwrap_or_else(|e| panic!("{name}: {table}.{column} not JSON: {e}"));
        }
    }
    let rows: Vec<(String, Vec<u8>)> = db
        .prepare("SELECT data_type, group_data FROM openmls_group_data")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(rows.len() >= 9, "{name}: {} rows", rows.len());
    for (data_type, value) in rows {
        assert_ne!(
            data_type, "message_secrets",
            "{name}: left in openmls's table"
        );
        if data_type == "join_group_config" {
            assert_eq!(value[0], b'{', "{name}: {data_type}");
        } else {
            assert_eq!(value[0], 0xC0, "{name}: {data_type} not compact");
        }
    }
    let (groups, first): (i64, Vec<u8>) = db
        .query_row(
            "SELECT count(DISTINCT group_id), (SELECT bytes FROM mls_message_secrets WHERE chunk = 0 LIMIT 1) FROM mls_message_secrets",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(groups >= 1, "{name}");
    assert_eq!(first[0], 0xC0, "{name}");
}

/// Delivers `out` to the profiles among `to` it is for; the texts each
/// got, in order.
fn deliver(out: &Outgoing, to: &mut [&mut Profile]) -> Vec<String> {
    let mut texts = Vec::new();
    for p in to.iter_mut() {
        if out.recipients.contains(&p.identity_key()) {
            for e in p.process(&out.message_id, &out.payload).unwrap() {
                if let Event::Message(m) = e {
                    texts.push(format!("{}: {}", p.username(), m.text));
                }
            }
        }
    }
    texts
}

/// Confirms `c` at its author and delivers its commit and Welcome.
fn commit(author: &mut Profile, c: CommitOutcome, to: &mut [&mut Profile]) {
    author.confirm_commit(&c.group_id).unwrap();
    for out in [&c.commit, &c.welcome].into_iter().flatten() {
        deliver(out, to);
    }
}

/// Writes the fixture with this release's code into the directory named
/// by `QUICNPROTOCHAT_FIXTURE_OUT` (which must not exist yet):
/// `QUICNPROTOCHAT_FIXTURE_OUT=crates/quicnprotochat-core/tests/fixtures/profiles-vN
/// cargo test -p quicnprotochat-core --test tests write_release_fixture -- --ignored`
#[test]
#[ignore = "writes the fixture of a release; run by hand"]
fn write_release_fixture() {
    let dir = PathBuf::from(std::env::var("QUICNPROTOCHAT_FIXTURE_OUT").unwrap());
    assert!(!dir.exists(), "{} exists", dir.display());
    std::fs::create_dir_all(&dir).unwrap();
    let create = |name: &str| Profile::create(&dir.join(name), &key(name), name).unwrap();
    let (mut alice, mut bob, mut carol) = (create("alice"), create("bob"), create("carol"));
    alice.create_group("g").unwrap();
    let kp = bob.generate_key_packages(1, false, 3600).unwrap().remove(0);
    let c = alice.add_member("g", &kp, bob.identity_key()).unwrap();
    commit(&mut alice, c, &mut [&mut bob]);
    let kp = carol
        .generate_key_packages(1, false, 3600)
        .unwrap()
        .remove(0);
    let c = alice.add_member("g", &kp, carol.identity_key()).unwrap();
    commit(&mut alice, c, &mut [&mut bob, &mut carol]);
    for i in 0..3 {
        let out = alice.send_text("g", &format!("alice {i}")).unwrap();
        deliver(&out, &mut [&mut bob, &mut carol]);
        let out = bob.send_text("g", &format!("bob {i}")).unwrap();
        deliver(&out, &mut [&mut alice, &mut carol]);
        let out = carol.send_text("g", &format!("carol {i}")).unwrap();
        deliver(&out, &mut [&mut alice, &mut bob]);
    }
    let c = bob.self_update("g").unwrap();
    commit(&mut bob, c, &mut [&mut alice, &mut carol]);
    let out = alice.send_text("g", "after bob's update").unwrap();
    deliver(&out, &mut [&mut bob, &mut carol]);

    let pending = carol.send_text("g", "sent before the upgrade").unwrap();
    std::fs::write(dir.join("carol-msg.id"), pending.message_id).unwrap();
    std::fs::write(dir.join("carol-msg.bin"), &pending.payload).unwrap();
    bob.generate_key_packages(1, false, 3600).unwrap();
    // Closing the profiles checkpoints their logs into the database files.
    drop((alice, bob, carol));
    for name in NAMES {
        let files: Vec<_> = std::fs::read_dir(dir.join(name))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, ["state.db"], "{name}");
    }
}

/// Key packages (with their private keys) kept in a profile.
fn key_packages(dir: &Path, name: &str) -> i64 {
    raw_db(dir, name)
        .query_row("SELECT count(*) FROM openmls_key_packages", [], |r| {
            r.get(0)
        })
        .unwrap()
}

/// carol's message sent before the upgrade, not delivered yet.
fn carol_pending(dir: &Path) -> Outgoing {
    Outgoing {
        recipients: Vec::new(),
        message_id: std::fs::read(dir.join("carol-msg.id"))
            .unwrap()
            .try_into()
            .unwrap(),
        payload: std::fs::read(dir.join("carol-msg.bin")).unwrap(),
    }
}

#[test]
fn a_profile_of_the_previous_release_migrates_and_its_groups_keep_working() {
    let dir = copy_fixture();
    let d = dir.path();
    for name in NAMES {
        assert_eq!(user_version(d, name), 9, "{name}: the fixture's schema");
    }
    let unused_before = key_packages(d, "bob");
    assert!(unused_before >= 1);
    let (mut alice, mut bob, mut carol) = (open(d, "alice"), open(d, "bob"), open(d, "carol"));
    for name in NAMES {
        assert_migrated(d, name);
    }

    // What was encrypted before the upgrade decrypts after it.
    let mut pending = carol_pending(d);
    pending.recipients = vec![alice.identity_key(), bob.identity_key()];
    assert_eq!(
        deliver(&pending, &mut [&mut alice, &mut bob]),
        [
            "alice: sent before the upgrade",
            "bob: sent before the upgrade"
        ]
    );
    // Messages each way after the migration.
    let out = carol.send_text("g", "after the upgrade").unwrap();
    assert_eq!(
        deliver(&out, &mut [&mut alice, &mut bob]),
        ["alice: after the upgrade", "bob: after the upgrade"]
    );
    let out = alice.send_text("g", "alice after the upgrade").unwrap();
    assert_eq!(
        deliver(&out, &mut [&mut bob, &mut carol]),
        [
            "bob: alice after the upgrade",
            "carol: alice after the upgrade"
        ]
    );
    // A commit by a migrated member, processed by the others.
    let c = alice.self_update("g").unwrap();
    commit(&mut alice, c, &mut [&mut bob, &mut carol]);
    let out = bob.send_text("g", "in the new epoch").unwrap();
    assert_eq!(
        deliver(&out, &mut [&mut alice, &mut carol]),
        ["alice: in the new epoch", "carol: in the new epoch"]
    );
    // bob's unused key package from before the upgrade is still in his
    // profile (whether it still opens a Welcome depends on the day: openmls
    // checks its lifetime against the system clock); a new one does.
    assert_eq!(key_packages(d, "bob"), unused_before);
    let kp = bob.generate_key_packages(1, false, 3600).unwrap().remove(0);
    alice.create_group("h").unwrap();
    let c = alice.add_member("h", &kp, bob.identity_key()).unwrap();
    commit(&mut alice, c, &mut [&mut bob]);
    let out = alice.send_text("h", "in h").unwrap();
    assert_eq!(deliver(&out, &mut [&mut bob]), ["bob: in h"]);

    // Migrated once, the profiles open again as they are.
    drop((alice, bob, carol));
    let (mut alice, mut bob, mut carol) = (open(d, "alice"), open(d, "bob"), open(d, "carol"));
    for name in NAMES {
        assert_migrated(d, name);
    }
    let out = alice.send_text("g", "after a restart").unwrap();
    assert_eq!(
        deliver(&out, &mut [&mut bob, &mut carol]),
        ["bob: after a restart", "carol: after a restart"]
    );
    let c = carol.self_update("g").unwrap();
    commit(&mut carol, c, &mut [&mut alice, &mut bob]);
    let out = bob.send_text("g", "after carol's update").unwrap();
    assert_eq!(
        deliver(&out, &mut [&mut alice, &mut carol]),
        ["alice: after carol's update", "carol: after carol's update"]
    );
}
