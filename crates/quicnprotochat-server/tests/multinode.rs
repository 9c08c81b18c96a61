//! Several server nodes on one PostgreSQL database: in-process servers on
//! loopback port 0, each with a data directory of its own, sharing a real
//! database (a private cluster the tests start).

use std::time::Duration;

use quicnprotochat_client::harness::{PgCluster, PgTls, TestServer};
use quicnprotochat_server::config::Secret;

use crate::support::msg_id;

fn node(url: &str) -> TestServer {
    let url = url.to_string();
    TestServer::start_with(move |c| c.database_url = Some(Secret(url))).unwrap()
}

/// Waits (up to `within`) until `server` reports `ready`.
async fn wait_ready(server: &TestServer, ready: bool, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let ok = match server.connect().await {
            Ok(c) => c.health().await.is_ok_and(|h| h.ok),
            Err(_) => false,
        };
        if ok == ready {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node did not report ready = {ready} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_subscriber_on_one_node_is_pushed_what_another_node_enqueues_in_order() {
    let db = PgCluster::shared().unwrap().database().await.unwrap();
    let (a, b) = (node(&db.url), node(&db.url));
    let alice = a.client("alice").await.unwrap();
    let bob = b.client("bob").await.unwrap();
    let to = [bob.identity.public_key()];
    let mut sub = bob.client.subscribe(1).await.unwrap();
    // Through the other node: only its announcement wakes bob's
    // subscription on node b.
    for i in 1..=30u64 {
        alice
            .client
            .enqueue(&to, msg_id(i), format!("m{i}").into_bytes())
            .await
            .unwrap();
    }
    for i in 1..=30u64 {
        let e = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap_or_else(|_| panic!("message {i} was not pushed"))
            .unwrap();
        assert_eq!((e.seq, e.payload), (i, format!("m{i}").into_bytes()));
    }
    // Then through bob's own node: the other node's announcement of these
    // is a duplicate wake and pushes nothing twice.
    for i in 31..=40u64 {
        bob.client
            .enqueue(&to, msg_id(i), format!("m{i}").into_bytes())
            .await
            .unwrap();
    }
    for i in 31..=40u64 {
        let e = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap_or_else(|_| panic!("message {i} was not pushed"))
            .unwrap();
        assert_eq!((e.seq, e.payload), (i, format!("m{i}").into_bytes()));
    }
    // Nothing pushed twice.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.next())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn after_the_database_restarts_nodes_serve_again_and_subscriptions_catch_up() {
    // A cluster of this test's own: it is stopped and started.
    let cluster = PgCluster::start().unwrap();
    let db = cluster.database().await.unwrap();
    let (a, b) = (node(&db.url), node(&db.url));
    let alice = a.client("alice").await.unwrap();
    let bob = b.client("bob").await.unwrap();
    let to = [bob.identity.public_key()];
    let mut sub = bob.client.subscribe(1).await.unwrap();
    alice
        .client
        .enqueue(&to, msg_id(1), b"before".to_vec())
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.seq, 1);

    cluster.stop_server(false).unwrap();
    wait_ready(&a, false, Duration::from_secs(20)).await;
    wait_ready(&b, false, Duration::from_secs(20)).await;
    // A send while the database is down is refused, never acknowledged.
    assert!(
        alice
            .client
            .enqueue(&to, msg_id(2), b"during".to_vec())
            .await
            .is_err()
    );

    cluster.start_server().unwrap();
    wait_ready(&a, true, Duration::from_secs(30)).await;
    wait_ready(&b, true, Duration::from_secs(30)).await;
    // The retry of the refused send, and more, through node a; bob's
    // subscription on node b, made before the outage, gets them all once.
    for i in 2..=11u64 {
        alice
            .client
            .enqueue(&to, msg_id(i), format!("m{i}").into_bytes())
            .await
            .unwrap();
    }
    for i in 2..=11u64 {
        let e = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .unwrap_or_else(|_| panic!("message {i} was not pushed after the restart"))
            .unwrap();
        assert_eq!((e.seq, e.payload), (i, format!("m{i}").into_bytes()));
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.next())
            .await
            .is_err()
    );
}

/// A certificate authority and a server certificate for `localhost` it
/// signed: (CA PEM, server certificate PEM, server key PEM).
fn ca_and_server_cert() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test database CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn tls_to_the_database_verifies_its_certificate() {
    let (ca, cert_pem, key_pem) = ca_and_server_cert();
    let cluster = PgCluster::start_tls(&PgTls { cert_pem, key_pem }).unwrap();
    let db = cluster.database().await.unwrap();
    let name = db.url.rsplit("dbname=").next().unwrap().to_string();
    let port = cluster.tcp_port().unwrap();
    let url = format!("host=localhost port={port} user=postgres dbname={name}");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();

    // The right authority: the node serves, over TLS only.
    let server = {
        let (url, ca_file) = (url.clone(), ca_file.clone());
        TestServer::start_with(move |c| {
            c.database_url = Some(Secret(url));
            c.database_ca = Some(ca_file);
        })
        .unwrap()
    };
    let alice = server.client("alice").await.unwrap();
    alice
        .client
        .enqueue(&[alice.identity.public_key()], msg_id(1), b"x".to_vec())
        .await
        .unwrap();
    let (admin, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let rows = admin
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'quicnprotochat-server'",
            &[],
        )
        .await
        .unwrap();
    assert!(!rows.is_empty());
    assert!(
        rows.iter().all(|r| r.get::<_, bool>(0)),
        "a connection without TLS"
    );
    drop(admin);
    let _ = conn.await;

    // Another authority: the node refuses to start rather than talk to a
    // database it cannot authenticate.
    let (other_ca, _, _) = ca_and_server_cert();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, other_ca).unwrap();
    let refused = TestServer::start_with(move |c| {
        c.database_url = Some(Secret(url));
        c.database_ca = Some(other);
    });
    let e = refused.unwrap_err().to_string();
    assert!(
        e.contains("certificate") || e.contains("tls") || e.contains("TLS"),
        "{e}"
    );
}
