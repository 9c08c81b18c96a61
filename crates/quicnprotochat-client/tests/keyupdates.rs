//! Automatic key updates through a real server: a member refreshes its
//! keys by itself once it sent the policy's number of messages, and the
//! group keeps working across the update.

use quicnprotochat_client::Event;
use quicnprotochat_client::harness::{TestServer, expect_event, next_messages};
use quicnprotochat_core::KeyUpdatePolicy;

#[tokio::test]
async fn a_member_updates_its_keys_by_itself_after_the_policys_messages() {
    let server = TestServer::start().unwrap();
    let alice = server.messenger("alice").await.unwrap();
    let bob = server.messenger("bob").await.unwrap();
    alice
        .set_key_update_policy(KeyUpdatePolicy {
            after_messages: 3,
            after_ms: KeyUpdatePolicy::DEFAULT.after_ms,
        })
        .await
        .unwrap();
    alice.invite("g", "bob").await.unwrap();
    let mut events = bob.listen().await.unwrap();
    let epoch = |m: &quicnprotochat_client::Messenger| {
        let m = m.clone();
        async move { m.groups().await.unwrap()[0].epoch }
    };
    let start = epoch(&alice).await;

    for i in 0..2 {
        alice.send("g", &format!("m{i}")).await.unwrap();
    }
    assert_eq!(epoch(&alice).await, start, "not due after 2 messages");
    alice.send("g", "m2").await.unwrap();
    assert_eq!(
        epoch(&alice).await,
        start + 1,
        "a self-update after the 3rd"
    );
    expect_event(
        &mut events,
        "alice's automatic update",
        |e| matches!(e, Event::KeyUpdated { group, by } if group == "g" && by == "alice"),
    )
    .await
    .unwrap();
    alice.send("g", "after the update").await.unwrap();
    let got = next_messages(&mut events, 1).await.unwrap();
    assert_eq!(got, [("alice".to_string(), "after the update".to_string())]);
}
