//! The `admin` command of the real binary, beside the running server on
//! its embedded database: exact counts of what clients stored, the deepest
//! queues without contents, the key-package stock, and `unregister` while
//! the server serves.

use std::process::Stdio;

use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_client::harness::ServerProcess;
use quicnprotochat_client::{Client, EnqueueResult, ServerErrorCode};
use quicnprotochat_core::{Identity, keypackage};

use crate::support::assert_code;

const BIN: &str = env!("CARGO_BIN_EXE_quicnprotochat-server");

fn admin(server: &ServerProcess, args: &[&str]) -> (bool, String, String) {
    let out = server
        .command()
        .arg("admin")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn admin_json(server: &ServerProcess, args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = admin(server, &[args, &["--json"]].concat());
    assert!(ok, "admin {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

struct User {
    identity: Identity,
    client: Client,
}

async fn user(server: &ServerProcess, name: &str, packages: usize) -> User {
    let identity = Identity::generate().unwrap();
    let client = Client::connect(server.client_config().unwrap())
        .await
        .unwrap();
    client.init_auth(&identity).await.unwrap();
    client.register(name).await.unwrap();
    if packages > 0 {
        let p = OpenMlsRustCrypto::default();
        let mut batch: Vec<Vec<u8>> = (0..packages)
            .map(|_| keypackage::build(&p, &identity, name, false, 3600).unwrap())
            .collect();
        batch.push(keypackage::build(&p, &identity, name, true, 3600).unwrap());
        assert_eq!(
            client.publish_key_packages(batch).await.unwrap(),
            u32::try_from(packages + 1).unwrap()
        );
    }
    User { identity, client }
}

fn fingerprint(identity: &Identity) -> String {
    hex::encode(identity.public_key().as_bytes())[..16].to_string()
}

#[tokio::test]
async fn admin_counts_what_clients_stored_and_unregisters_beside_the_running_server() {
    let server = ServerProcess::start(BIN).unwrap();
    let alice = user(&server, "alice", 3).await;
    let bob = user(&server, "bob", 1).await;
    let carol = user(&server, "carol", 0).await;
    // A sender with no username: it stores nothing of its own.
    let sender = Client::connect(server.client_config().unwrap())
        .await
        .unwrap();
    sender
        .init_auth(&Identity::generate().unwrap())
        .await
        .unwrap();
    let send = |to: Vec<&User>, n: u8, bytes: usize| {
        let recipients: Vec<_> = to.iter().map(|u| u.identity.public_key()).collect();
        let sender = &sender;
        async move {
            let r = sender
                .enqueue(&recipients, [n; 16], vec![n; bytes])
                .await
                .unwrap();
            assert!(matches!(r, EnqueueResult::Stored(_)));
        }
    };
    for n in 1..=3 {
        send(vec![&bob], n, 100).await;
    }
    for n in 4..=5 {
        send(vec![&carol], n, 50).await;
    }
    send(vec![&bob, &carol], 6, 7).await;

    let stats = admin_json(&server, &["stats"]);
    assert_eq!(
        stats,
        serde_json::json!({
            "identities": 3,
            "usernames": 3,
            "queues": 2,
            "messages": 7,
            "payload_bytes": 407,
            "key_packages": 4,
            "last_resort_key_packages": 2,
        })
    );
    let (ok, table, _) = admin(&server, &["stats"]);
    assert!(ok);
    assert!(
        table.contains("messages waiting") && table.contains("407"),
        "{table}"
    );

    let queues = admin_json(&server, &["queues"]);
    let rows = queues.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["identity"], fingerprint(&bob.identity));
    assert_eq!(rows[0]["depth"], 4);
    assert_eq!(rows[1]["identity"], fingerprint(&carol.identity));
    assert_eq!(rows[1]["depth"], 3);
    assert!(rows[0]["oldest_age_secs"].as_u64().unwrap() < 600);
    assert_eq!(
        admin_json(&server, &["queues", "--limit", "1"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (_, table, _) = admin(&server, &["queues"]);
    assert!(table.contains(&fingerprint(&bob.identity)), "{table}");
    // Never a payload, a message id or a full key.
    assert!(
        !table.contains(&hex::encode(bob.identity.public_key().as_bytes())),
        "{table}"
    );

    let stock = admin_json(&server, &["key-packages"]);
    assert_eq!(
        stock,
        serde_json::json!([
            {"identity": fingerprint(&carol.identity), "username": "carol", "one_time": 0, "last_resort": false},
            {"identity": fingerprint(&bob.identity), "username": "bob", "one_time": 1, "last_resort": true},
            {"identity": fingerprint(&alice.identity), "username": "alice", "one_time": 3, "last_resort": true},
        ])
    );

    // Unregister while the server runs: bob's name is free, his key
    // packages gone, his queue kept for him.
    let done = admin_json(&server, &["unregister", "bob"]);
    assert_eq!(done["key_packages_removed"], 2);
    assert_eq!(done["identity"], fingerprint(&bob.identity));
    let (ok, _, err) = admin(&server, &["unregister", "bob"]);
    assert!(!ok && err.contains("no user is registered"), "{err}");
    assert_code(alice.client.resolve("bob").await, ServerErrorCode::NotFound);
    let kept = bob.client.fetch(0, 100).await.unwrap();
    assert_eq!(kept.len(), 4, "bob's queue is kept");
    assert_code(
        sender
            .enqueue(&[bob.identity.public_key()], [9; 16], vec![9])
            .await,
        ServerErrorCode::NotFound,
    );
    let dave = user(&server, "bob", 0).await;
    assert_ne!(dave.identity.public_key(), bob.identity.public_key());
    let after = admin_json(&server, &["stats"]);
    assert_eq!(after["usernames"], 3);
    assert_eq!(after["messages"], 7);
    assert_eq!(after["key_packages"], 3);
    assert_eq!(after["identities"], 4);
}
