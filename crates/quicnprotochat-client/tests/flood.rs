//! Nobody can fill someone else's queue: a stranger (a sender without the
//! recipient's delivery token) has a small share of a small lane beside
//! the queue, so a flood neither blocks a group member's message nor a
//! Welcome from someone else the recipient shares no group with yet.

use std::time::Instant;

use quicnprotochat_client::harness::{TestServer, message_texts};
use quicnprotochat_client::{Event, ServerErrorCode};
use quicnprotochat_core::clock::SystemClock;

#[tokio::test]
async fn a_flooder_cannot_block_a_group_members_message_or_a_welcome() {
    // The defaults' proportions (10 000, 1 000, 20), a hundredth of the size.
    let server = TestServer::start_with(|c| {
        c.limits.queue_depth = 100;
        c.limits.stranger_queue_depth = 10;
        c.limits.stranger_messages_per_sender = 2;
    })
    .unwrap();
    let alice = server.messenger("alice").await.unwrap();
    let bob = server.messenger("bob").await.unwrap();
    let carol = server.messenger("carol").await.unwrap();
    alice.invite("g", "bob").await.unwrap();
    // Bob joins and tells alice his delivery token inside the group.
    bob.sync().await.unwrap();
    let learned = alice.sync().await.unwrap();
    assert!(
        learned
            .iter()
            .any(|e| matches!(e, Event::DeliveryTokenAnnounced { member, .. } if member == "bob")),
        "{learned:?}"
    );

    // Mallory, who shares no group with bob, floods his queue.
    let bob_key = bob.identity_key().await;
    let mallory = server.client("mallory").await.unwrap();
    let clock = SystemClock::new();
    let (mut stored, mut refused) = (0, 0);
    let started = Instant::now();
    for _ in 0..300 {
        let id = quicnprotochat_core::new_message_id(&clock).unwrap();
        match mallory.client.enqueue(&[bob_key], id, vec![0xAA; 64]).await {
            Ok(_) => stored += 1,
            Err(e) if e.server_code() == Some(ServerErrorCode::QueueFull) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "flood: 300 enqueues in {elapsed:?} ({:.0}/s): {stored} stored, {refused} refused with queueFull",
        300.0 / elapsed.as_secs_f64()
    );
    // A group member's message still gets in...
    let sent = alice.send("g", "still here").await;
    assert!(sent.is_ok(), "a member's message was refused: {sent:?}");
    // ...and so does a Welcome from carol, a stranger to bob too.
    let invited = carol.invite("h", "bob").await;
    assert!(invited.is_ok(), "a Welcome was refused: {invited:?}");
    let events = bob.sync().await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Joined { group, by, .. } if group == "h" && by == "carol")),
        "{events:?}"
    );
    assert_eq!(message_texts(events), ["still here"]);
    assert_eq!(stored, 2, "a stranger has 2 messages waiting at most");
    assert_eq!(refused, 298);

    // Once bob has read his queue, mallory gets his share again, no more.
    let id = quicnprotochat_core::new_message_id(&clock).unwrap();
    mallory
        .client
        .enqueue(&[bob_key], id, vec![0xAA; 64])
        .await
        .unwrap();
}
