//! End-to-end: the real server binary, MLS clients (the client library's
//! `Messenger`) with encrypted profiles, groups, messages, failures.

use std::time::Duration;

use quicnprotochat_client::harness::{
    ServerProcess, expect_event, expect_no_message, impostor_adds, next_messages,
};
use quicnprotochat_client::{Event, EventStream, Messenger};

const BIN: &str = env!("CARGO_BIN_EXE_quicnprotochat-server");
async fn expect(stream: &mut EventStream, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
    expect_event(stream, what, pred).await.unwrap()
}

async fn messages(stream: &mut EventStream, n: usize) -> Vec<(String, String)> {
    next_messages(stream, n).await.unwrap()
}

async fn no_message(stream: &mut EventStream, quiet: Duration) {
    expect_no_message(stream, quiet).await.unwrap()
}

fn pair(s: &str, t: &str) -> (String, String) {
    (s.to_string(), t.to_string())
}

/// alice, bob and carol in group "friends", everyone listening.
async fn friends(server: &ServerProcess) -> [(Messenger, EventStream); 3] {
    let alice = server.messenger("alice").await.unwrap();
    let bob = server.messenger("bob").await.unwrap();
    let carol = server.messenger("carol").await.unwrap();
    let mut a_ev = alice.listen().await.unwrap();
    let mut b_ev = bob.listen().await.unwrap();
    let mut c_ev = carol.listen().await.unwrap();
    alice.invite("friends", "bob").await.unwrap();
    expect(
        &mut b_ev,
        "bob joins",
        |e| matches!(e, Event::Joined { group, by, .. } if group == "friends" && by == "alice"),
    )
    .await;
    alice.invite("friends", "carol").await.unwrap();
    expect(&mut c_ev, "carol joins", |e| {
        matches!(e, Event::Joined { .. })
    })
    .await;
    expect(
        &mut b_ev,
        "bob sees carol added",
        |e| matches!(e, Event::MembersAdded { members, .. } if members == &["carol"]),
    )
    .await;
    let _ = &mut a_ev;
    [(alice, a_ev), (bob, b_ev), (carol, c_ev)]
}

#[tokio::test]
async fn e2e_happy_path_register_invite_join_send_recv() {
    let server = ServerProcess::start(BIN).unwrap();
    let [(alice, mut a_ev), (bob, mut b_ev), (carol, mut c_ev)] = friends(&server).await;

    alice.send("friends", "hello from alice").await.unwrap();
    assert_eq!(
        messages(&mut b_ev, 1).await,
        [pair("alice", "hello from alice")]
    );
    assert_eq!(
        messages(&mut c_ev, 1).await,
        [pair("alice", "hello from alice")]
    );
    bob.send("friends", "hello from bob").await.unwrap();
    assert_eq!(
        messages(&mut a_ev, 1).await,
        [pair("bob", "hello from bob")]
    );
    assert_eq!(
        messages(&mut c_ev, 1).await,
        [pair("bob", "hello from bob")]
    );
    carol.send("friends", "hello from carol").await.unwrap();
    assert_eq!(
        messages(&mut a_ev, 1).await,
        [pair("carol", "hello from carol")]
    );
    assert_eq!(
        messages(&mut b_ev, 1).await,
        [pair("carol", "hello from carol")]
    );

    // Senders do not get their own messages back, and each history is complete.
    no_message(&mut a_ev, Duration::from_millis(300)).await;
    for m in [&alice, &bob, &carol] {
        let h: Vec<_> = m
            .history("friends", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|m| (m.sender, m.text))
            .collect();
        assert_eq!(
            h,
            [
                pair("alice", "hello from alice"),
                pair("bob", "hello from bob"),
                pair("carol", "hello from carol")
            ]
        );
        let members: Vec<_> = m
            .members("friends")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.username)
            .collect();
        assert_eq!(members, ["alice", "bob", "carol"]);
    }
}

#[tokio::test]
async fn removed_member_cannot_read_and_self_update_keeps_the_group_going() {
    let server = ServerProcess::start(BIN).unwrap();
    let [(alice, mut a_ev), (bob, mut b_ev), (carol, mut c_ev)] = friends(&server).await;

    alice.remove("friends", "carol").await.unwrap();
    expect(
        &mut c_ev,
        "carol learns she was removed",
        |e| matches!(e, Event::Removed { by, .. } if by == "alice"),
    )
    .await;
    expect(
        &mut b_ev,
        "bob sees carol removed",
        |e| matches!(e, Event::MembersRemoved { members, .. } if members == &["carol"]),
    )
    .await;
    alice.send("friends", "after carol left").await.unwrap();
    assert_eq!(
        messages(&mut b_ev, 1).await,
        [pair("alice", "after carol left")]
    );
    no_message(&mut c_ev, Duration::from_millis(500)).await;
    assert!(
        carol
            .history("friends", 10)
            .await
            .unwrap()
            .iter()
            .all(|m| m.text != "after carol left")
    );
    assert!(
        carol.send("friends", "can I?").await.is_err(),
        "a removed member cannot send"
    );

    bob.update("friends").await.unwrap();
    expect(
        &mut a_ev,
        "alice sees bob's key update",
        |e| matches!(e, Event::KeyUpdated { by, .. } if by == "bob"),
    )
    .await;
    bob.send("friends", "fresh keys").await.unwrap();
    assert_eq!(messages(&mut a_ev, 1).await, [pair("bob", "fresh keys")]);
}

#[tokio::test]
async fn concurrent_commits_in_one_epoch_leave_everyone_in_the_same_epoch() {
    let server = ServerProcess::start(BIN).unwrap();
    let [(alice, mut a_ev), (bob, mut b_ev), (carol, mut c_ev)] = friends(&server).await;
    let (rb, rc) = tokio::join!(bob.update("friends"), carol.update("friends"));
    rb.unwrap();
    rc.unwrap();
    // Let every member process both commits, then compare epochs.
    alice.send("friends", "sync point").await.unwrap();
    messages(&mut b_ev, 1).await;
    messages(&mut c_ev, 1).await;
    let mut epochs = Vec::new();
    for m in [&alice, &bob, &carol] {
        epochs.push(m.groups().await.unwrap()[0].epoch);
    }
    assert!(
        epochs.iter().all(|e| *e == epochs[0]),
        "forked epochs {epochs:?}"
    );
    assert_eq!(epochs[0], 4, "create, two adds, two updates");
    carol.send("friends", "still one group").await.unwrap();
    assert_eq!(
        messages(&mut a_ev, 1).await,
        [pair("carol", "still one group")]
    );
    assert_eq!(
        messages(&mut b_ev, 1).await,
        [pair("carol", "still one group")]
    );
}

#[tokio::test]
async fn restarted_client_keeps_groups_and_offline_member_catches_up_in_order() {
    let mut server = ServerProcess::start(BIN).unwrap();
    let [(alice, _a_ev), (bob, b_ev), (carol, mut c_ev)] = friends(&server).await;
    // Bob goes offline (process exit: messenger and listener dropped).
    drop(b_ev);
    drop(bob);
    for i in 0..30 {
        alice.send("friends", &format!("m{i:02}")).await.unwrap();
    }
    assert_eq!(messages(&mut c_ev, 30).await.len(), 30);
    // The server restarts (kill -9) with bob's messages still queued.
    drop(alice);
    drop(c_ev);
    drop(carol);
    server.restart().unwrap();

    let bob = server.reopen_messenger("bob").await.unwrap();
    assert_eq!(bob.groups().await.unwrap()[0].name, "friends");
    let mut b_ev = bob.listen().await.unwrap();
    let got = messages(&mut b_ev, 30).await;
    let expected: Vec<_> = (0..30)
        .map(|i| pair("alice", &format!("m{i:02}")))
        .collect();
    assert_eq!(got, expected, "in order, no gaps");
    no_message(&mut b_ev, Duration::from_millis(500)).await;

    // The restarted clients still talk.
    let alice = server.reopen_messenger("alice").await.unwrap();
    let mut a_ev = alice.listen().await.unwrap();
    bob.send("friends", "back online").await.unwrap();
    assert_eq!(messages(&mut a_ev, 1).await, [pair("bob", "back online")]);
    assert_eq!(bob.history("friends", 100).await.unwrap().len(), 31);
}

#[tokio::test]
async fn an_invitee_whose_key_package_claims_another_name_is_refused() {
    let server = ServerProcess::start(BIN).unwrap();
    let alice = server.messenger("alice").await.unwrap();
    let _bob = server.messenger("bob").await.unwrap();
    // mallory registers under her own name but publishes key packages whose
    // credential says "bob", hoping to show up as bob in alice's group.
    let mallory = quicnprotochat_core::Identity::generate().unwrap();
    let c = quicnprotochat_client::Client::connect(server.client_config().unwrap())
        .await
        .unwrap();
    c.init_auth(&mallory).await.unwrap();
    c.register("mallory").await.unwrap();
    let p = openmls_rust_crypto::OpenMlsRustCrypto::default();
    let forged = quicnprotochat_core::keypackage::build(&p, &mallory, "bob", false, 3600).unwrap();
    c.publish_key_packages(vec![forged]).await.unwrap();
    let r = alice.invite("friends", "mallory").await;
    assert!(
        matches!(
            r,
            Err(quicnprotochat_client::MessengerError::Group(
                quicnprotochat_core::GroupError::WrongInvitee
            ))
        ),
        "{r:?}"
    );
    assert!(
        alice
            .members("friends")
            .await
            .map(|m| m.len() <= 1)
            .unwrap_or(true)
    );
}

#[tokio::test]
async fn a_member_whose_credential_claims_another_users_name_is_flagged() {
    let server = ServerProcess::start(BIN).unwrap();
    let alice = server.messenger("alice").await.unwrap();
    let _bob = server.messenger("bob").await.unwrap();
    let mut a_ev = alice.listen().await.unwrap();
    // mallory's client puts "bob" in her MLS credential, registers as mallory,
    // and adds alice to a group.
    let dir = tempfile::tempdir().unwrap();
    let mallory = impostor_adds(
        server.client_config().unwrap(),
        &dir.path().join("m"),
        "bob",
        "mallory",
        "trap",
        alice.identity_key().await,
    )
    .await
    .unwrap();
    expect(
        &mut a_ev,
        "alice joins",
        |e| matches!(e, Event::Joined { by, .. } if by == "bob"),
    )
    .await;
    expect(&mut a_ev, "alice is warned", |e| {
        matches!(e, Event::DirectoryMismatch { member, key, .. } if member == "bob" && *key == mallory)
    })
    .await;
}
