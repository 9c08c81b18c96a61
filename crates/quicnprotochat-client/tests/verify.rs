//! Safety numbers and verified contacts: both sides compute the same
//! number, key updates do not change it, and a verified contact's name
//! showing up with another key is flagged.

use quicnprotochat_client::Event;
use quicnprotochat_client::harness::{TestServer, expect_event, impostor_adds};
use quicnprotochat_core::Verification;

use crate::cli::{cli, register, run_ok};

#[tokio::test]
async fn both_sides_compute_the_same_safety_number_and_a_key_update_keeps_it() {
    let server = TestServer::start().unwrap();
    let alice = server.messenger("alice").await.unwrap();
    let bob = server.messenger("bob").await.unwrap();
    let _carol = server.messenger("carol").await.unwrap();
    alice.invite("g", "bob").await.unwrap();
    bob.sync().await.unwrap();

    let [a] = alice
        .contacts_named("bob")
        .await
        .unwrap()
        .try_into()
        .unwrap();
    let [b] = bob
        .contacts_named("alice")
        .await
        .unwrap()
        .try_into()
        .unwrap();
    assert_eq!(a.safety_number, b.safety_number);
    assert_eq!(a.key, bob.identity_key().await);
    assert_eq!(a.verification, Verification::Unverified);

    // Someone we share no group with: the directory's key, another number.
    let [c] = alice
        .contacts_named("carol")
        .await
        .unwrap()
        .try_into()
        .unwrap();
    assert_ne!(c.safety_number, a.safety_number);

    // Bob refreshes his MLS keys: his identity, and the number, stay.
    bob.update("g").await.unwrap();
    alice.sync().await.unwrap();
    let [again] = alice
        .contacts_named("bob")
        .await
        .unwrap()
        .try_into()
        .unwrap();
    assert_eq!(again.safety_number, a.safety_number);

    alice.mark_verified(&a).await.unwrap();
    let [verified] = alice
        .contacts_named("bob")
        .await
        .unwrap()
        .try_into()
        .unwrap();
    assert_eq!(verified.verification, Verification::Verified);
}

#[tokio::test]
async fn a_verified_contacts_name_with_another_key_is_flagged() {
    let server = TestServer::start().unwrap();
    let alice = server.messenger("alice").await.unwrap();
    let bob = server.messenger("bob").await.unwrap();
    alice.invite("g", "bob").await.unwrap();
    bob.sync().await.unwrap();
    let [real] = alice
        .contacts_named("bob")
        .await
        .unwrap()
        .try_into()
        .unwrap();
    alice.mark_verified(&real).await.unwrap();
    let mut events = alice.listen().await.unwrap();

    // Mallory's client puts "bob" in her MLS credential, registers as
    // mallory, and adds alice to a group.
    let dir = tempfile::tempdir().unwrap();
    let fake = impostor_adds(
        server.client_config(),
        &dir.path().join("m"),
        "bob",
        "mallory",
        "trap",
        alice.identity_key().await,
    )
    .await
    .unwrap();
    let real_key = real.key;
    expect_event(&mut events, "the verified-key warning", |e| {
        matches!(e, Event::VerifiedKeyChanged { group, member, key, verified }
            if group == "trap" && member == "bob" && *key == fake && *verified == real_key)
    })
    .await
    .unwrap();
    // Both "bob"s are listed, each with its state and its own number.
    let contacts = alice.contacts_named("bob").await.unwrap();
    assert_eq!(contacts.len(), 2);
    let fake_contact = contacts.iter().find(|c| c.key == fake).unwrap();
    assert_eq!(
        fake_contact.verification,
        Verification::Changed { verified: real_key }
    );
    assert_ne!(fake_contact.safety_number, real.safety_number);
}

#[test]
fn the_command_line_shows_equal_numbers_and_confirms() {
    let server = TestServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    register(&server, &alice, "alice");
    register(&server, &bob, "bob");
    run_ok(cli(&server, &alice).args(["invite", "g", "bob"]));
    run_ok(cli(&server, &bob).args(["sync"]));

    let number = |profile: &std::path::Path, user: &str| -> serde_json::Value {
        let out = run_ok(cli(&server, profile).args(["--json", "verify", user]));
        serde_json::from_str(out.trim()).unwrap()
    };
    let (a, b) = (number(&alice, "bob"), number(&bob, "alice"));
    assert_eq!(a["safety_number"], b["safety_number"]);
    assert_eq!(a["safety_number"].as_str().unwrap().len(), 60);
    assert_eq!(a["state"], "unverified");
    let text = run_ok(cli(&server, &alice).args(["verify", "bob"]));
    assert!(text.contains("not verified"), "{text}");
    assert!(text.contains("verify bob --confirm"), "{text}");

    run_ok(cli(&server, &alice).args(["verify", "bob", "--confirm"]));
    assert_eq!(number(&alice, "bob")["state"], "verified");
    let members = run_ok(cli(&server, &alice).args(["members", "g"]));
    assert!(
        members
            .lines()
            .any(|l| l.starts_with("bob ") && l.ends_with("(verified)")),
        "{members}"
    );
}
