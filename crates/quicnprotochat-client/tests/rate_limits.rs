//! The client waits out the server's rate limits as the protocol says,
//! instead of dropping what a user typed or failing a login.

use quicnprotochat_client::harness::{TestServer, message_texts};

#[tokio::test]
async fn messages_typed_faster_than_the_send_limit_are_all_sent_in_order() {
    // A tight bucket: 3 at once, then 20 a second.
    let server = TestServer::start_with(|c| {
        c.limits.rates.enqueue_per_identity.burst = 3;
        c.limits.rates.enqueue_per_identity.per_second = 20;
    })
    .unwrap();
    let alice = server.messenger("alice").await.unwrap();
    let bob = server.messenger("bob").await.unwrap();
    alice.invite("g", "bob").await.unwrap();
    bob.sync().await.unwrap();
    let sent: Vec<String> = (0..15).map(|i| format!("line {i}")).collect();
    for line in &sent {
        alice.send("g", line).await.unwrap();
    }
    let got = message_texts(bob.sync().await.unwrap());
    assert_eq!(got, sent);
}

#[tokio::test]
async fn logins_faster_than_the_address_limit_all_get_in() {
    // Each login costs one token; 2 at once, then 5 a second, and eight
    // logins back to back (a person running commands quickly).
    let server = TestServer::start_with(|c| {
        c.limits.rates.auth_per_ip.burst = 2;
        c.limits.rates.auth_per_ip.per_second = 5;
    })
    .unwrap();
    let id = quicnprotochat_core::Identity::generate().unwrap();
    for _ in 0..8 {
        let c = server.connect().await.unwrap();
        c.init_auth(&id).await.unwrap();
    }
}
