//! Peer-to-peer delivery over iroh on loopback (relays disabled, no
//! internet), with the server as fallback.

use std::time::Duration;

use quicnprotochat_client::harness::{TestServer, expect_event, next_messages};
use quicnprotochat_client::{Event, EventStream, Messenger, P2pOptions};

async fn expect(stream: &mut EventStream, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
    expect_event(stream, what, pred).await.unwrap()
}

async fn message(stream: &mut EventStream) -> (String, String) {
    next_messages(stream, 1).await.unwrap().remove(0)
}

/// alice and bob in group "g", both reachable directly and aware of each other.
async fn pair(
    server: &TestServer,
    alice_opts: P2pOptions,
) -> (Messenger, EventStream, Messenger, EventStream) {
    let alice = server.messenger("alice").await.unwrap();
    let bob = server.messenger("bob").await.unwrap();
    alice.enable_p2p(alice_opts).await.unwrap();
    bob.enable_p2p(P2pOptions::default()).await.unwrap();
    let mut a_ev = alice.listen().await.unwrap();
    let mut b_ev = bob.listen().await.unwrap();
    alice.invite("g", "bob").await.unwrap();
    expect(
        &mut b_ev,
        "bob learns alice's address",
        |e| matches!(e, Event::PeerAnnounced { member, .. } if member == "alice"),
    )
    .await;
    expect(
        &mut a_ev,
        "alice learns bob's address",
        |e| matches!(e, Event::PeerAnnounced { member, .. } if member == "bob"),
    )
    .await;
    (alice, a_ev, bob, b_ev)
}

#[tokio::test]
async fn members_talk_directly_while_the_server_is_stopped() {
    let mut server = TestServer::start().unwrap();
    let (alice, mut a_ev, bob, mut b_ev) = pair(&server, P2pOptions::default()).await;
    server.stop();
    alice.send("g", "direct hello").await.unwrap();
    assert_eq!(
        message(&mut b_ev).await,
        ("alice".into(), "direct hello".into())
    );
    bob.send("g", "direct reply").await.unwrap();
    assert_eq!(
        message(&mut a_ev).await,
        ("bob".into(), "direct reply".into())
    );
    assert_eq!(bob.history("g", 10).await.unwrap().len(), 2);
}

#[tokio::test]
async fn an_unreachable_peer_gets_the_message_through_the_server() {
    let server = TestServer::start().unwrap();
    let (alice, _a_ev, bob, mut b_ev) = pair(&server, P2pOptions::default()).await;
    bob.disable_p2p().await;
    alice.send("g", "via the server").await.unwrap();
    assert_eq!(
        message(&mut b_ev).await,
        ("alice".into(), "via the server".into())
    );
}

#[tokio::test]
async fn a_message_delivered_both_ways_appears_once() {
    let server = TestServer::start().unwrap();
    let redundant = P2pOptions {
        redundant: true,
        ..P2pOptions::default()
    };
    let (alice, _a_ev, bob, mut b_ev) = pair(&server, redundant).await;
    alice.send("g", "twice on the wire").await.unwrap();
    assert_eq!(
        message(&mut b_ev).await,
        ("alice".into(), "twice on the wire".into())
    );
    // Both copies have arrived once the server copy is processed: sync and check.
    tokio::time::sleep(Duration::from_millis(500)).await;
    bob.sync().await.unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if let Some(Event::Message(m)) = b_ev.next().await {
                return m;
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "the second copy must not show: {quiet:?}");
    let history = bob.history("g", 10).await.unwrap();
    assert_eq!(
        history
            .iter()
            .filter(|m| m.text == "twice on the wire")
            .count(),
        1
    );
}

#[tokio::test]
async fn a_connection_from_an_unknown_endpoint_is_refused() {
    let server = TestServer::start().unwrap();
    let (alice, _a_ev, bob, mut b_ev) = pair(&server, P2pOptions::default()).await;
    let bob_addr = bob.p2p_addr().await.unwrap();
    // A stranger (an endpoint id never announced in bob's groups) that
    // learned bob's address is refused, and nothing reaches bob.
    let (stranger, _rx) = quicnprotochat_p2p::Node::bind([0x42; 32], Default::default())
        .await
        .unwrap();
    let r = stranger.send(&bob_addr, [9; 16], b"let me in").await;
    assert!(r.is_err(), "must be refused, got {r:?}");
    // alice, announced in the group, still gets through.
    alice.send("g", "hi").await.unwrap();
    assert_eq!(message(&mut b_ev).await, ("alice".into(), "hi".into()));
    stranger.close().await;
}

#[tokio::test]
async fn the_endpoint_id_is_stable_across_restarts() {
    let server = TestServer::start().unwrap();
    let alice = server.messenger("alice").await.unwrap();
    let first = alice.enable_p2p(P2pOptions::default()).await.unwrap();
    alice.disable_p2p().await;
    drop(alice);
    let alice = server.reopen_messenger("alice").await.unwrap();
    let second = alice.enable_p2p(P2pOptions::default()).await.unwrap();
    assert_eq!(
        first, second,
        "the endpoint key lives in the encrypted profile"
    );
    let other = server.messenger("bob").await.unwrap();
    assert_ne!(
        other.enable_p2p(P2pOptions::default()).await.unwrap(),
        first
    );
}
