//! The key-package directory.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_client::ServerErrorCode;
use quicnprotochat_client::harness::{TestClient, TestServer};
use quicnprotochat_core::clock::ManualClock;
use quicnprotochat_core::keypackage;

use crate::support::assert_code;

fn packages(c: &TestClient, n: usize, last_resort: bool, lifetime: u64) -> Vec<Vec<u8>> {
    let p = OpenMlsRustCrypto::default();
    (0..n)
        .map(|_| keypackage::build(&p, &c.identity, &c.username, last_resort, lifetime).unwrap())
        .collect()
}

#[tokio::test]
async fn each_package_is_handed_out_once_then_the_last_resort_is_kept() {
    let server = TestServer::start().unwrap();
    let alice = server.client("alice").await.unwrap();
    let bob = server.client("bob").await.unwrap();
    let mut batch = packages(&alice, 3, false, 3600);
    batch.extend(packages(&alice, 1, true, 3600));
    assert_eq!(
        alice
            .client
            .publish_key_packages(batch.clone())
            .await
            .unwrap(),
        4
    );
    // Republishing the same packages stores nothing new.
    assert_eq!(
        alice
            .client
            .publish_key_packages(batch[..3].to_vec())
            .await
            .unwrap(),
        0
    );
    assert_eq!(alice.client.key_package_count().await.unwrap(), (3, true));

    let key = alice.identity.public_key();
    let mut seen = HashSet::new();
    for _ in 0..3 {
        let (kp, last_resort) = bob.client.fetch_key_package(key).await.unwrap();
        assert!(!last_resort);
        assert!(batch[..3].contains(&kp));
        assert!(seen.insert(kp), "handed out twice");
    }
    assert_eq!(alice.client.key_package_count().await.unwrap(), (0, true));
    for _ in 0..2 {
        let (kp, last_resort) = bob.client.fetch_key_package(key).await.unwrap();
        assert!(last_resort);
        assert_eq!(kp, batch[3]);
    }
    // Served packages validate as the owner's.
    assert_eq!(keypackage::inspect(&batch[3]).unwrap().identity, key);
    assert_code(
        bob.client
            .fetch_key_package(bob.identity.public_key())
            .await,
        ServerErrorCode::NotFound,
    );
}

#[tokio::test]
async fn concurrent_fetches_never_hand_out_a_package_twice() {
    let server = TestServer::start_with(|c| {
        c.limits.rates.key_package_fetch_per_identity.burst = 1_000;
        c.limits.rates.key_package_fetch_per_ip.burst = 1_000;
    })
    .unwrap();
    let alice = server.client("alice").await.unwrap();
    assert_eq!(
        alice
            .client
            .publish_key_packages(packages(&alice, 40, false, 3600))
            .await
            .unwrap(),
        40
    );
    let key = alice.identity.public_key();
    let mut fetchers = Vec::new();
    for i in 0..8 {
        fetchers.push(server.client(&format!("fetcher{i}")).await.unwrap());
    }
    let mut tasks = Vec::new();
    for f in &fetchers {
        for _ in 0..6 {
            let c = f.client.clone();
            tasks.push(tokio::spawn(async move { c.fetch_key_package(key).await }));
        }
    }
    let mut seen = HashSet::new();
    let mut not_found = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok((kp, false)) => assert!(seen.insert(kp), "a key package was handed out twice"),
            Ok((_, true)) => panic!("no last-resort package was published"),
            Err(e) => {
                assert_eq!(e.server_code(), Some(ServerErrorCode::NotFound), "{e}");
                not_found += 1;
            }
        }
    }
    assert_eq!(seen.len(), 40);
    assert_eq!(not_found, 8);
}

#[tokio::test]
async fn expired_packages_are_never_served() {
    let clock = Arc::new(ManualClock::starting_now());
    let server = TestServer::start_with(|c| c.clock = clock.clone()).unwrap();
    let alice = server.client("alice").await.unwrap();
    let bob = server.client("bob").await.unwrap();
    let mut batch = packages(&alice, 2, false, 1);
    batch.extend(packages(&alice, 1, true, 1));
    assert_eq!(alice.client.publish_key_packages(batch).await.unwrap(), 3);
    // The server's clock passes their end (no sleeping: the clock is the
    // server's own).
    clock.advance(Duration::from_millis(2_100));
    assert_eq!(alice.client.key_package_count().await.unwrap(), (0, false));
    assert_code(
        bob.client
            .fetch_key_package(alice.identity.public_key())
            .await,
        ServerErrorCode::NotFound,
    );
}

#[tokio::test]
async fn invalid_foreign_and_oversized_batches_are_refused() {
    let server = TestServer::start_with(|c| c.limits.max_key_packages_per_identity = 5).unwrap();
    let alice = server.client("alice").await.unwrap();
    let bob = server.client("bob").await.unwrap();
    assert_code(
        alice
            .client
            .publish_key_packages(vec![b"garbage".to_vec()])
            .await,
        ServerErrorCode::InvalidArgument,
    );
    assert_code(
        alice.client.publish_key_packages(vec![]).await,
        ServerErrorCode::InvalidArgument,
    );
    // Bob's packages uploaded by alice.
    assert_code(
        alice
            .client
            .publish_key_packages(packages(&bob, 1, false, 3600))
            .await,
        ServerErrorCode::Forbidden,
    );
    // Over the per-call cap.
    let many = vec![packages(&alice, 1, false, 3600)[0].clone(); 101];
    assert_code(
        alice.client.publish_key_packages(many).await,
        ServerErrorCode::TooLarge,
    );
    // Over the per-identity cap: nothing of the batch is stored.
    assert_code(
        alice
            .client
            .publish_key_packages(packages(&alice, 6, false, 3600))
            .await,
        ServerErrorCode::TooLarge,
    );
    assert_eq!(alice.client.key_package_count().await.unwrap(), (0, false));
    assert_eq!(
        alice
            .client
            .publish_key_packages(packages(&alice, 5, false, 3600))
            .await
            .unwrap(),
        5
    );
    // Two last-resort packages in one call.
    assert_code(
        alice
            .client
            .publish_key_packages(packages(&alice, 2, true, 3600))
            .await,
        ServerErrorCode::InvalidArgument,
    );
}

#[tokio::test]
async fn key_package_exhaustion_is_rate_limited() {
    let server = TestServer::start_with(|c| {
        c.limits.rates.key_package_fetch_per_identity.per_second = 1;
        c.limits.rates.key_package_fetch_per_identity.burst = 5;
    })
    .unwrap();
    let alice = server.client("alice").await.unwrap();
    let mallory = server.client("mallory").await.unwrap();
    alice
        .client
        .publish_key_packages(packages(&alice, 20, false, 3600))
        .await
        .unwrap();
    let mut limited = false;
    for _ in 0..20 {
        if let Err(e) = mallory
            .client
            .fetch_key_package(alice.identity.public_key())
            .await
        {
            assert_eq!(e.server_code(), Some(ServerErrorCode::RateLimited));
            limited = true;
            break;
        }
    }
    assert!(limited, "repeated fetches must hit the rate limit");
    let (left, _) = alice.client.key_package_count().await.unwrap();
    assert!(
        left >= 14,
        "the limit must stop the drain early, {left} left"
    );
}
