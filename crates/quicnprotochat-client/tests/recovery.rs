//! Nothing the server acknowledged is lost in the client: a commit the
//! server stored before the client stopped is merged when it comes back,
//! and a message that arrives before the epoch it needs is kept and shown
//! once that epoch arrives.

use quicnprotochat_client::Event;
use quicnprotochat_client::harness::{TestServer, message_texts, test_profile_key};
use quicnprotochat_core::Profile;
use quicnprotochat_core::profile::MAX_HELD;

/// Enqueues `out` as alice's client would: with the delivery tokens the
/// recipients announced to her (a raw client without them is a stranger,
/// whose messages the server holds to a small share of the queue).
async fn enqueue(
    c: &quicnprotochat_client::Client,
    p: &Profile,
    out: quicnprotochat_core::Outgoing,
) {
    let tokens: Vec<_> = out
        .recipients
        .iter()
        .map(|r| p.delivery_token_of(*r).unwrap())
        .collect();
    c.enqueue_with_tokens(&out.recipients, &tokens, out.message_id, out.payload)
        .await
        .unwrap();
}

/// The profile of `name` opened directly (its messenger must be closed).
fn profile(server: &TestServer, name: &str) -> Profile {
    Profile::open(
        &server.temp_dir().join("profiles").join(name),
        &test_profile_key(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_commit_the_server_stored_before_the_client_stopped_is_merged_on_restart() {
    let server = TestServer::start().unwrap();
    let (alice, bob) = server.pair("g").await.unwrap();
    drop(alice);
    // Alice's client commits a key update, the server stores it, and the
    // client stops before it merges the commit.
    {
        let mut p = profile(&server, "alice");
        let commit = p.self_update("g").unwrap().commit.unwrap();
        let c = server.connect_as(p.identity()).await.unwrap();
        c.enqueue(&commit.recipients, commit.message_id, commit.payload)
            .await
            .unwrap();
    }
    // Bob merges it and writes in the new epoch.
    let events = bob.sync().await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::KeyUpdated { by, .. } if by == "alice")),
        "{events:?}"
    );
    bob.send("g", "after your update").await.unwrap();

    // Alice comes back: her commit is merged and she reads bob's message.
    let alice = server.reopen_messenger("alice").await.unwrap();
    assert_eq!(
        message_texts(alice.sync().await.unwrap()),
        ["after your update"]
    );
    alice.send("g", "still here").await.unwrap();
    assert_eq!(message_texts(bob.sync().await.unwrap()), ["still here"]);
    // The group is not stuck behind a pending commit.
    alice.update("g").await.unwrap();
    bob.sync().await.unwrap();
    bob.send("g", "and after that").await.unwrap();
    assert_eq!(
        message_texts(alice.sync().await.unwrap()),
        ["and after that"]
    );
}

#[tokio::test]
async fn a_commit_the_server_never_got_is_sent_on_restart() {
    let server = TestServer::start().unwrap();
    let (alice, bob) = server.pair("g").await.unwrap();
    drop(alice);
    // The client stops after making the commit, before sending it.
    profile(&server, "alice").self_update("g").unwrap();
    let alice = server.reopen_messenger("alice").await.unwrap();
    alice.sync().await.unwrap();
    let events = bob.sync().await.unwrap();
    assert!(
        events.iter().any(|e| matches!(e, Event::KeyUpdated { .. })),
        "{events:?}"
    );
    bob.send("g", "in the new epoch").await.unwrap();
    assert_eq!(
        message_texts(alice.sync().await.unwrap()),
        ["in the new epoch"]
    );
}

#[tokio::test]
async fn a_message_ahead_of_its_epoch_is_kept_and_shown_when_the_epoch_arrives() {
    let server = TestServer::start().unwrap();
    let (alice, bob) = server.pair("g").await.unwrap();
    drop(alice);
    // Alice's messages of the next epoch reach bob's queue before the
    // commit that starts it (as when bob processes them while a commit
    // is still on its way).
    {
        let mut p = profile(&server, "alice");
        let outcome = p.self_update("g").unwrap();
        p.confirm_commit_and_queue(&outcome).unwrap();
        let c = server.connect_as(p.identity()).await.unwrap();
        for text in ["early one", "early two"] {
            let m = p.send_text("g", text).unwrap();
            c.enqueue(&m.recipients, m.message_id, m.payload)
                .await
                .unwrap();
        }
        let commit = outcome.commit.unwrap();
        c.enqueue(&commit.recipients, commit.message_id, commit.payload)
            .await
            .unwrap();
    }
    let events = bob.sync().await.unwrap();
    let held: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Undecryptable { group, kept, held } => Some((group.clone(), *kept, *held)),
            _ => None,
        })
        .collect();
    assert_eq!(
        held,
        [(Some("g".into()), true, 1), (Some("g".into()), true, 2)],
        "{events:?}"
    );
    assert_eq!(message_texts(events), ["early one", "early two"]);
    // Shown once: nothing is held any more, nothing comes again.
    assert!(bob.sync().await.unwrap().is_empty());
}

#[tokio::test]
async fn the_hold_is_bounded() {
    let server = TestServer::start().unwrap();
    let (alice, bob) = server.pair("g").await.unwrap();
    drop(alice);
    let extra = 3;
    {
        let mut p = profile(&server, "alice");
        let outcome = p.self_update("g").unwrap();
        p.confirm_commit_and_queue(&outcome).unwrap();
        let c = server.connect_as(p.identity()).await.unwrap();
        for i in 0..MAX_HELD + extra {
            let m = p.send_text("g", &format!("early {i}")).unwrap();
            enqueue(&c, &p, m).await;
        }
        let commit = outcome.commit.unwrap();
        c.enqueue(&commit.recipients, commit.message_id, commit.payload)
            .await
            .unwrap();
    }
    let events = bob.sync().await.unwrap();
    let dropped = events
        .iter()
        .filter(|e| matches!(e, Event::Undecryptable { kept: false, .. }))
        .count();
    assert_eq!(dropped, usize::try_from(extra).unwrap());
    let texts = message_texts(events);
    assert_eq!(texts.len(), usize::try_from(MAX_HELD).unwrap());
    assert_eq!(texts[0], "early 0");
}

#[tokio::test]
async fn messages_of_a_group_we_left_are_not_held() {
    let server = TestServer::start().unwrap();
    let (alice, bob) = server.pair("g").await.unwrap();
    bob.leave("g").await.unwrap();
    // Alice writes before she processed bob's leaving.
    alice.send("g", "are you there?").await.unwrap();
    let events = bob.sync().await.unwrap();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Undecryptable { .. })),
        "{events:?}"
    );
    drop(bob);
    assert_eq!(profile(&server, "bob").held_count().unwrap(), 0);
}
