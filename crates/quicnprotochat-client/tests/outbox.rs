//! The outbox: when the Welcome of a merged commit fails to send, a later
//! sync (after a restart too) sends it again, so an invitee is never left
//! out of a group that its other members already count them in.

use quicnprotochat_client::harness::{TestServer, message_texts};
use quicnprotochat_client::{Event, MessengerError, ServerErrorCode};

fn joined(events: &[Event]) -> bool {
    events
        .iter()
        .any(|e| matches!(e, Event::Joined { group, by, .. } if group == "g" && by == "alice"))
}

#[tokio::test]
async fn a_welcome_refused_for_a_full_queue_is_sent_by_a_later_sync() {
    // Bob is a stranger to the filler and to alice (until he joins): they
    // share his stranger lane.
    let server = TestServer::start_with(|c| {
        c.limits.queue_depth = 2;
        c.limits.stranger_queue_depth = 2;
    })
    .unwrap();
    let alice = server.messenger("alice").await.unwrap();
    let bob = server.messenger("bob").await.unwrap();
    let bob_key = bob.identity_key().await;
    // Someone fills bob's queue to the cap.
    let filler = server.client("filler").await.unwrap();
    for i in 0..2u8 {
        let id =
            quicnprotochat_core::new_message_id(&quicnprotochat_core::clock::SystemClock::new())
                .unwrap();
        filler
            .client
            .enqueue(&[bob_key], id, vec![i; 8])
            .await
            .unwrap();
    }

    // The add commits (alice is alone, so the commit goes to nobody), then
    // the Welcome finds bob's queue full: reported, and kept.
    let r = alice.invite("g", "bob").await;
    assert!(
        matches!(
            &r,
            Err(MessengerError::Client(e)) if e.server_code() == Some(ServerErrorCode::QueueFull)
        ),
        "{r:?}"
    );
    assert_eq!(
        alice.members("g").await.unwrap().len(),
        2,
        "bob is in alice's group"
    );
    // The outbox is in the profile: it survives alice's client restarting.
    drop(alice);
    let alice = server.reopen_messenger("alice").await.unwrap();

    // Bob drains his queue (two undecryptable payloads): no Welcome yet.
    assert!(!joined(&bob.sync().await.unwrap()));
    // Alice's next sync sends the Welcome from her outbox...
    alice.sync().await.unwrap();
    // ...and bob joins and reads.
    assert!(joined(&bob.sync().await.unwrap()));
    alice.send("g", "welcome, finally").await.unwrap();
    let got = message_texts(bob.sync().await.unwrap());
    assert_eq!(got, ["welcome, finally"]);
    // Sent once: a further sync sends nothing more.
    alice.sync().await.unwrap();
    assert!(bob.sync().await.unwrap().is_empty());
}
