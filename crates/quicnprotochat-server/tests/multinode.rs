//! Several server nodes on one PostgreSQL database: in-process servers on
//! loopback port 0, each with a data directory of its own, sharing a real
//! database (a private cluster the tests start).

use std::time::Duration;

use quicnprotochat_client::harness::{PgCluster, TestServer};
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
