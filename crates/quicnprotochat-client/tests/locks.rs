//! No lock is held across a round trip to the server: while a call waits
//! for an answer that does not come, the profile stays usable (its reads,
//! marking messages shown, processing what arrives by another path).

use std::time::Duration;

use quicnprotochat_client::harness::{TEST_TOKEN, TestServer, UdpRelay, test_profile_key};
use quicnprotochat_client::{ClientConfig, Messenger, ServerAuth};

/// How long local operations may take while a call is stuck.
const LOCAL: Duration = Duration::from_secs(5);

/// Waits (up to [`LOCAL`]) until the relay saw a datagram since the cut:
/// the call is on its way.
async fn call_sent(relay: &UdpRelay) {
    let deadline = tokio::time::Instant::now() + LOCAL;
    while relay.seen() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the call never went out"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Local reads and writes of `bob`'s profile, within [`LOCAL`].
async fn profile_answers(bob: &Messenger, what: &str) {
    let local = tokio::time::timeout(LOCAL, async {
        bob.history("g", 10).await.unwrap();
        bob.groups().await.unwrap();
        let unshown = bob.unshown(10).await.unwrap();
        bob.mark_shown(&unshown).await.unwrap();
    })
    .await;
    assert!(
        local.is_ok(),
        "the profile stayed locked while {what} waited for the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_profile_stays_usable_while_the_server_does_not_answer() {
    let server = TestServer::start().unwrap();
    let relay = UdpRelay::start(server.addr()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = ClientConfig::new(
        relay.addr(),
        ServerAuth::Pinned(server.fingerprint()),
        TEST_TOKEN,
    );
    config.call_timeout = Duration::from_secs(60);
    let bob = Messenger::register(&dir.path().join("bob"), &test_profile_key(), config, "bob")
        .await
        .unwrap();
    let alice = server.messenger("alice").await.unwrap();
    alice.invite("g", "bob").await.unwrap();
    bob.sync().await.unwrap();

    // The server stops answering while bob syncs...
    relay.cut_after(0);
    let syncing = tokio::spawn({
        let bob = bob.clone();
        async move { bob.sync().await }
    });
    call_sent(&relay).await;
    profile_answers(&bob, "a sync").await;
    syncing.abort();

    // ...and while bob's commit is on its way.
    relay.cut_after(0);
    let updating = tokio::spawn({
        let bob = bob.clone();
        async move { bob.update("g").await }
    });
    call_sent(&relay).await;
    profile_answers(&bob, "a commit").await;
    updating.abort();
}
