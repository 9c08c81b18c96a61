//! Clients that fail over: a deployment of several server nodes on one
//! PostgreSQL database (in-process nodes on loopback port 0 sharing one
//! certificate, a real database the tests start), and messengers that know
//! them all.

use quicnprotochat_client::harness::{PgCluster, TestServer, message_texts};
use quicnprotochat_server::config::Secret;
use quicnprotochat_server::server::{DEV_CERT_FILE, DEV_KEY_FILE};

/// A node on `url`; with `like`, it presents that node's certificate (one
/// certificate for the deployment, so one pin trusts every node).
fn node(url: &str, like: Option<&TestServer>) -> TestServer {
    let url = url.to_string();
    let tls = like.map(|n| {
        (
            n.data_dir().join(DEV_CERT_FILE),
            n.data_dir().join(DEV_KEY_FILE),
        )
    });
    TestServer::start_with(move |c| {
        c.database_url = Some(Secret(url));
        c.tls_paths = tls;
    })
    .unwrap()
}

#[tokio::test]
async fn when_a_node_stops_its_clients_fail_over_and_every_message_arrives_once_in_order() {
    let db = PgCluster::shared().unwrap().database().await.unwrap();
    let mut a = node(&db.url, None);
    let b = node(&db.url, Some(&a));
    assert_eq!(a.fingerprint(), b.fingerprint());
    // Alice uses node a, bob node b; each knows the other node.
    let mut alice_cfg = a.client_config();
    alice_cfg.fallback_addrs = vec![b.addr()];
    let mut bob_cfg = b.client_config();
    bob_cfg.fallback_addrs = vec![a.addr()];
    let alice = a.messenger_with("alice", alice_cfg).await.unwrap();
    let bob = a.messenger_with("bob", bob_cfg).await.unwrap();
    alice.invite("g", "bob").await.unwrap();
    bob.sync().await.unwrap();
    alice.sync().await.unwrap();

    let texts: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    for t in &texts[..10] {
        alice.send("g", t).await.unwrap();
    }
    // Alice's node stops; her next send finds node b by itself.
    a.stop();
    for t in &texts[10..] {
        alice.send("g", t).await.unwrap();
    }
    assert_eq!(message_texts(bob.sync().await.unwrap()), texts);
    // Nothing twice.
    assert!(message_texts(bob.sync().await.unwrap()).is_empty());
    // And alice reads through node b too.
    bob.send("g", "got all twenty").await.unwrap();
    assert_eq!(
        message_texts(alice.sync().await.unwrap()),
        ["got all twenty"]
    );
}
