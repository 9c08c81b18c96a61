//! Queues: enqueue, fetch, ack, push subscriptions, durability.

use std::time::Duration;

use quicnprotochat_client::harness::TestServer;
use quicnprotochat_client::{EnqueueResult, OutgoingMessage, ServerErrorCode};
use quicnprotochat_core::{Identity, IdentityKey};
use quicnprotochat_proto::limits::{MAX_BATCH_RECIPIENTS, MAX_ENQUEUE_BATCH, MAX_PAYLOAD_BYTES};

use crate::support::{assert_code, assert_still_serving, msg_id, pushed, raw_session, trio};

#[tokio::test]
async fn enqueue_fetch_ack_round_trip_with_fan_out() {
    let server = TestServer::start().unwrap();
    let (alice, bob, carol) = trio(&server).await;
    let (b, c) = (bob.identity.public_key(), carol.identity.public_key());
    let r = alice
        .client
        .enqueue(&[b, c], msg_id(1), b"ciphertext-1".to_vec())
        .await
        .unwrap();
    assert_eq!(r, EnqueueResult::Stored(vec![1, 1]));
    let r = alice
        .client
        .enqueue(&[b], msg_id(2), b"ciphertext-2".to_vec())
        .await
        .unwrap();
    assert_eq!(r, EnqueueResult::Stored(vec![2]));

    let got = bob.client.fetch(1, 100).await.unwrap();
    assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(got[0].payload, b"ciphertext-1");
    assert_eq!(got[0].message_id, msg_id(1));
    assert_eq!(got[1].payload, b"ciphertext-2");
    assert!(got[0].enqueued_at_ms > 0);
    // From a sequence number, with a limit.
    assert_eq!(bob.client.fetch(2, 100).await.unwrap().len(), 1);
    assert_eq!(bob.client.fetch(1, 1).await.unwrap().len(), 1);

    assert_eq!(bob.client.ack(1).await.unwrap(), 1);
    assert_eq!(
        bob.client
            .fetch(0, 100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        [2]
    );
    // Carol's copy is independent of Bob's ack.
    assert_eq!(
        carol.client.fetch(0, 100).await.unwrap()[0].payload,
        b"ciphertext-1"
    );
    assert_eq!(bob.client.ack(10).await.unwrap(), 1);
    assert!(bob.client.fetch(0, 100).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_retried_enqueue_is_not_stored_twice() {
    let server = TestServer::start().unwrap();
    let (alice, bob, carol) = trio(&server).await;
    let b = bob.identity.public_key();
    alice
        .client
        .enqueue(&[b], msg_id(7), b"once".to_vec())
        .await
        .unwrap();
    assert_eq!(
        alice
            .client
            .enqueue(&[b], msg_id(7), b"once".to_vec())
            .await
            .unwrap(),
        EnqueueResult::Duplicate
    );
    // Even after the recipient acknowledged it.
    bob.client.ack(1).await.unwrap();
    assert_eq!(
        alice
            .client
            .enqueue(&[b], msg_id(7), b"once".to_vec())
            .await
            .unwrap(),
        EnqueueResult::Duplicate
    );
    assert!(bob.client.fetch(0, 10).await.unwrap().is_empty());
    // The same id from another sender is a different message.
    assert!(matches!(
        carol
            .client
            .enqueue(&[b], msg_id(7), b"other".to_vec())
            .await
            .unwrap(),
        EnqueueResult::Stored(_)
    ));
}

#[tokio::test]
async fn only_the_owner_can_fetch_ack_or_subscribe() {
    let server = TestServer::start().unwrap();
    let (alice, bob, mallory) = trio(&server).await;
    let b = bob.identity.public_key();
    alice
        .client
        .enqueue(&[b], msg_id(1), b"for bob".to_vec())
        .await
        .unwrap();
    assert_code(
        mallory.client.fetch_queue(b, 0, 10).await,
        ServerErrorCode::Forbidden,
    );
    assert_code(
        mallory.client.ack_queue(b, 100).await,
        ServerErrorCode::Forbidden,
    );
    assert_code(
        mallory.client.subscribe_queue(b, 0).await,
        ServerErrorCode::Forbidden,
    );
    assert_eq!(
        bob.client.fetch(0, 10).await.unwrap().len(),
        1,
        "bob's queue must be unchanged"
    );
}

#[tokio::test]
async fn a_full_queue_refuses_and_drops_nothing() {
    let server = TestServer::start_with(|c| c.limits.queue_depth = 3).unwrap();
    let (alice, bob, carol) = trio(&server).await;
    let (b, c) = (bob.identity.public_key(), carol.identity.public_key());
    for i in 0..3 {
        alice
            .client
            .enqueue(&[b], msg_id(i), vec![i as u8 + 1])
            .await
            .unwrap();
    }
    let refused = alice
        .client
        .enqueue(&[c, b], msg_id(9), b"x".to_vec())
        .await;
    // The message names the full queue's recipient by the key the caller gave.
    match &refused {
        Err(e) => assert!(e.to_string().contains(&b.to_string()), "{e}"),
        Ok(r) => panic!("expected queueFull, got {r:?}"),
    }
    assert_code(refused, ServerErrorCode::QueueFull);
    // Atomic: carol did not get it either, and bob's three are intact.
    assert!(carol.client.fetch(0, 10).await.unwrap().is_empty());
    assert_eq!(
        bob.client
            .fetch(0, 10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.payload[0])
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    bob.client.ack(1).await.unwrap();
    assert!(matches!(
        alice
            .client
            .enqueue(&[c, b], msg_id(9), b"x".to_vec())
            .await
            .unwrap(),
        EnqueueResult::Stored(_)
    ));
}

#[tokio::test]
async fn payload_cap_and_argument_checks() {
    let server = TestServer::start().unwrap();
    let (alice, bob, _) = trio(&server).await;
    let b = bob.identity.public_key();
    assert_code(
        alice
            .client
            .enqueue(&[b], msg_id(1), vec![0; MAX_PAYLOAD_BYTES + 1])
            .await,
        ServerErrorCode::TooLarge,
    );
    // Exactly the cap is accepted and delivered intact.
    let big: Vec<u8> = (0..MAX_PAYLOAD_BYTES).map(|i| (i % 251) as u8).collect();
    alice
        .client
        .enqueue(&[b], msg_id(2), big.clone())
        .await
        .unwrap();
    assert_eq!(bob.client.fetch(0, 10).await.unwrap()[0].payload, big);
    assert_code(
        alice.client.enqueue(&[b], msg_id(3), vec![]).await,
        ServerErrorCode::InvalidArgument,
    );
    assert_code(
        alice.client.enqueue(&[], msg_id(4), b"x".to_vec()).await,
        ServerErrorCode::InvalidArgument,
    );
    assert_code(
        alice
            .client
            .enqueue(&[b, b], msg_id(5), b"x".to_vec())
            .await,
        ServerErrorCode::InvalidArgument,
    );
    let stranger = Identity::generate().unwrap().public_key();
    assert_code(
        alice
            .client
            .enqueue(&[stranger], msg_id(6), b"x".to_vec())
            .await,
        ServerErrorCode::NotFound,
    );
}

#[tokio::test(flavor = "current_thread")]
async fn recipient_keys_and_message_ids_of_the_wrong_length_are_refused() {
    let server = TestServer::start().unwrap();
    let bob = server.client("bob").await.unwrap();
    let alice = Identity::generate().unwrap();
    tokio::task::LocalSet::new()
        .run_until(async {
            let raw = raw_session(&server, &alice).await;
            for (key_len, id_len) in [(31, 16), (33, 16), (0, 16), (32, 15), (32, 0)] {
                let mut req = raw.session.enqueue_request();
                {
                    let mut p = req.get();
                    let mut list = p.reborrow().init_recipients(1);
                    let key = if key_len == 32 {
                        bob.identity.public_key().0.to_vec()
                    } else {
                        vec![1; key_len]
                    };
                    list.set(0, &key);
                    p.set_message_id(&vec![0; id_len]);
                    p.set_payload(b"x");
                }
                let resp = req.send().promise.await.unwrap();
                let r = resp.get().unwrap();
                assert!(r.has_error(), "{key_len}/{id_len} must be refused");
                assert_eq!(
                    r.get_error().unwrap().get_code().unwrap(),
                    quicnprotochat_proto::schema::ErrorCode::InvalidArgument
                );
            }
            let mut req = raw.session.fetch_request();
            req.get().set_recipient(&[1; 31]);
            let resp = req.send().promise.await.unwrap();
            assert!(resp.get().unwrap().has_error());
        })
        .await;
    assert!(bob.client.fetch(0, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn subscriptions_push_in_order_and_resume_without_gaps() {
    let server = TestServer::start().unwrap();
    let (alice, bob, _) = trio(&server).await;
    let b = bob.identity.public_key();
    alice
        .client
        .enqueue(&[b], msg_id(1), b"m1".to_vec())
        .await
        .unwrap();
    let mut sub = bob.client.subscribe(1).await.unwrap();
    let first = pushed(&mut sub).await;
    assert_eq!((first.seq, first.payload.as_slice()), (1, b"m1".as_slice()));
    for i in 2..=20u64 {
        alice
            .client
            .enqueue(&[b], msg_id(i), format!("m{i}").into_bytes())
            .await
            .unwrap();
    }
    for i in 2..=10u64 {
        let e = pushed(&mut sub).await;
        assert_eq!(e.seq, i);
        assert_eq!(e.payload, format!("m{i}").into_bytes());
    }
    // "Disconnect" after seq 10, more arrives while away, then resume from 11.
    drop(sub);
    drop(bob.client);
    for i in 21..=30u64 {
        alice
            .client
            .enqueue(&[b], msg_id(i), format!("m{i}").into_bytes())
            .await
            .unwrap();
    }
    let bob2 = server.connect_as(&bob.identity).await.unwrap();
    let mut sub = bob2.subscribe(11).await.unwrap();
    for i in 11..=30u64 {
        let e = pushed(&mut sub).await;
        assert_eq!(e.seq, i, "gap or reorder after resume");
    }
    let more = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    assert!(
        more.is_err(),
        "no duplicates after the last message, got {more:?}"
    );
}

#[tokio::test]
async fn a_subscription_to_a_backlog_larger_than_one_read_pushes_all_of_it() {
    // More than two reads' worth (256 messages each) waits before the
    // subscription starts, and nothing is sent after it: the subscription
    // must keep reading the store until it has nothing more, not wait for
    // a commit that never comes.
    let server = TestServer::start_with(|c| {
        c.limits.rates.enqueue_per_identity.burst = 10_000;
        c.limits.rates.enqueue_per_ip.burst = 10_000;
    })
    .unwrap();
    let (alice, bob, _) = trio(&server).await;
    let b = bob.identity.public_key();
    const QUEUED: u64 = 600;
    for chunk in (1..=QUEUED).collect::<Vec<_>>().chunks(64) {
        let batch = chunk
            .iter()
            .map(|&i| OutgoingMessage {
                recipients: vec![b],
                tokens: Vec::new(),
                message_id: msg_id(i),
                payload: format!("m{i}").into_bytes(),
            })
            .collect();
        for r in alice.client.enqueue_batch(batch).await.unwrap() {
            r.unwrap();
        }
    }
    let mut sub = bob.client.subscribe(1).await.unwrap();
    for i in 1..=QUEUED {
        let e = pushed(&mut sub).await;
        assert_eq!(e.seq, i);
        assert_eq!(e.payload, format!("m{i}").into_bytes());
    }
    let more = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    assert!(more.is_err(), "nothing after the backlog, got {more:?}");
    // And what is committed afterwards still arrives.
    alice
        .client
        .enqueue(&[b], msg_id(QUEUED + 1), b"after".to_vec())
        .await
        .unwrap();
    let e = pushed(&mut sub).await;
    assert_eq!(
        (e.seq, e.payload.as_slice()),
        (QUEUED + 1, b"after".as_slice())
    );
}

#[tokio::test]
async fn restart_keeps_queued_messages_and_key_packages() {
    let mut server = TestServer::start().unwrap();
    let (alice, bob, _) = trio(&server).await;
    let b = bob.identity.public_key();
    for i in 1..=5u64 {
        alice
            .client
            .enqueue(&[b], msg_id(i), format!("m{i}").into_bytes())
            .await
            .unwrap();
    }
    let p = openmls_rust_crypto::OpenMlsRustCrypto::default();
    let kps: Vec<_> = (0..3)
        .map(|_| {
            quicnprotochat_core::keypackage::build(&p, &bob.identity, "bob", false, 3600).unwrap()
        })
        .collect();
    bob.client.publish_key_packages(kps).await.unwrap();
    drop((alice, bob.client));
    server.restart().unwrap();
    let bob2 = server.connect_as(&bob.identity).await.unwrap();
    let got = bob2.fetch(0, 100).await.unwrap();
    assert_eq!(
        got.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(got[4].payload, b"m5");
    assert_eq!(bob2.key_package_count().await.unwrap(), (3, false));
    assert_eq!(bob2.resolve("alice").await.unwrap().0.len(), 32);
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn enqueue_is_rate_limited_per_identity() {
    let server = TestServer::start_with(|c| {
        c.limits.rates.enqueue_per_identity.per_second = 1;
        c.limits.rates.enqueue_per_identity.burst = 10;
    })
    .unwrap();
    let (alice, bob, carol) = trio(&server).await;
    let b = bob.identity.public_key();
    let mut stored = 0;
    let mut limited = false;
    for i in 0..30 {
        match alice.client.enqueue(&[b], msg_id(i), b"x".to_vec()).await {
            Ok(_) => stored += 1,
            Err(e) => {
                assert_eq!(e.server_code(), Some(ServerErrorCode::RateLimited));
                limited = true;
                break;
            }
        }
    }
    assert!(limited && (10..30).contains(&stored), "stored {stored}");
    // Other identities are not affected.
    carol
        .client
        .enqueue(&[b], msg_id(100), b"y".to_vec())
        .await
        .unwrap();
}

#[tokio::test]
async fn the_server_accepts_one_commit_per_group_epoch() {
    use quicnprotochat_core::{Profile, ProfileKey};
    let server = TestServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = ProfileKey::Passphrase("p".into());
    let mut profiles: Vec<Profile> = ["alice", "bob", "carol"]
        .iter()
        .map(|n| Profile::create(&dir.path().join(n), &key, n).unwrap())
        .collect();
    let mut clients = Vec::new();
    for p in &profiles {
        let c = server.connect_as(p.identity()).await.unwrap();
        c.register(p.username()).await.unwrap();
        clients.push(c);
    }
    // alice builds the group alone (no commit is sent while she is the only member).
    profiles[0].create_group("g").unwrap();
    for i in [1, 2] {
        let kp = profiles[i]
            .generate_key_packages(1, false, 3600)
            .unwrap()
            .remove(0);
        let invitee = profiles[i].identity_key();
        let out = profiles[0].add_member("g", &kp, invitee).unwrap();
        if let Some(c) = &out.commit {
            clients[0]
                .enqueue(&c.recipients, c.message_id, c.payload.clone())
                .await
                .unwrap();
        }
        profiles[0].confirm_commit(&out.group_id).unwrap();
        let w = out.welcome.unwrap();
        clients[0]
            .enqueue(&w.recipients, w.message_id, w.payload.clone())
            .await
            .unwrap();
    }
    for i in [1, 2] {
        for env in clients[i].fetch(1, 100).await.unwrap() {
            profiles[i].process(&env.message_id, &env.payload).unwrap();
        }
        let last = clients[i].fetch(1, 100).await.unwrap().last().unwrap().seq;
        clients[i].ack(last).await.unwrap();
    }
    // bob and carol commit in the same epoch: bob first.
    let b = profiles[1].self_update("g").unwrap();
    let c = profiles[2].self_update("g").unwrap();
    let bc = b.commit.clone().unwrap();
    clients[1]
        .enqueue(&bc.recipients, bc.message_id, bc.payload.clone())
        .await
        .unwrap();
    let cc = c.commit.clone().unwrap();
    assert_code(
        clients[2]
            .enqueue(&cc.recipients, cc.message_id, cc.payload.clone())
            .await,
        ServerErrorCode::StaleEpoch,
    );
    // The loser's commit reached nobody.
    let alice_queue = clients[0].fetch(1, 100).await.unwrap();
    assert_eq!(alice_queue.len(), 1, "only the winning commit is queued");
    // carol discards hers, processes bob's, and her retry in the new epoch is accepted.
    profiles[2].abort_commit(&c.group_id).unwrap();
    for env in clients[2].fetch(1, 100).await.unwrap() {
        profiles[2].process(&env.message_id, &env.payload).unwrap();
    }
    let retry = profiles[2].self_update("g").unwrap().commit.unwrap();
    clients[2]
        .enqueue(&retry.recipients, retry.message_id, retry.payload.clone())
        .await
        .unwrap();
    // Non-MLS payloads are never subject to ordering.
    let b_key = profiles[1].identity_key();
    clients[0]
        .enqueue(&[b_key], msg_id(999), b"opaque".to_vec())
        .await
        .unwrap();
}

#[tokio::test]
async fn concurrent_senders_are_pushed_once_in_order_beyond_the_push_buffer() {
    // Two senders with many enqueues in flight each (completions arrive out
    // of order) and more messages than a recipient's push buffer holds
    // while the subscriber does not read: every message arrives exactly
    // once, in sequence order, whether it came from memory or the store.
    let server = TestServer::start().unwrap();
    let (alice, bob, carol) = trio(&server).await;
    let b = bob.identity.public_key();
    let mut sub = bob.client.subscribe(1).await.unwrap();
    let per_sender = 200u64;
    let send_all = |client: &'static str, base: u64| {
        let c = if client == "alice" { &alice } else { &carol };
        futures::future::join_all((0..per_sender).map(move |i| async move {
            c.client
                .enqueue(&[b], msg_id(base + i), format!("{client}-{i}").into_bytes())
                .await
                .unwrap()
        }))
    };
    tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join(send_all("alice", 0), send_all("carol", 10_000)),
    )
    .await
    .unwrap();

    let mut got = Vec::new();
    for _ in 0..2 * per_sender {
        let e = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap()
            .unwrap();
        got.push(e);
    }
    let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=2 * per_sender).collect::<Vec<_>>());
    let mut payloads: Vec<String> = got
        .iter()
        .map(|e| String::from_utf8(e.payload.clone()).unwrap())
        .collect();
    payloads.sort();
    let mut sent: Vec<String> = (0..per_sender)
        .flat_map(|i| [format!("alice-{i}"), format!("carol-{i}")])
        .collect();
    sent.sort();
    assert_eq!(payloads, sent);
    let more = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    assert!(more.is_err(), "no duplicates, got {more:?}");

    // After an acknowledgement, the next message is pushed as usual.
    bob.client.ack(2 * per_sender).await.unwrap();
    alice
        .client
        .enqueue(&[b], msg_id(99_999), b"after the ack".to_vec())
        .await
        .unwrap();
    let e = pushed(&mut sub).await;
    assert_eq!(
        (e.seq, e.payload.as_slice()),
        (2 * per_sender + 1, b"after the ack".as_slice())
    );
    // A subscription from before the acknowledgement gets nothing the
    // store deleted, from memory or otherwise.
    let mut again = bob.client.subscribe(2 * per_sender - 50).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), again.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.seq, 2 * per_sender + 1);
}

#[tokio::test]
async fn a_subscription_started_during_an_enqueue_is_woken_by_it() {
    // The subscription is set up while the enqueue is on its way to the
    // store: whichever wins, the message must be pushed, not left waiting
    // for the next one.
    let server = TestServer::start().unwrap();
    let (alice, bob, _) = trio(&server).await;
    let to = [bob.identity.public_key()];
    for i in 1..=30u64 {
        let (sent, sub) = tokio::join!(
            alice
                .client
                .enqueue(&to, msg_id(i), format!("m{i}").into_bytes()),
            bob.client.subscribe(i),
        );
        sent.unwrap();
        let mut sub = sub.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap_or_else(|_| panic!("message {i} was not pushed"))
            .unwrap();
        assert_eq!(e.seq, i);
        drop(sub);
    }
}

#[tokio::test]
async fn a_damaged_page_in_the_middle_of_the_store_makes_the_server_not_ready() {
    let mut server = TestServer::start().unwrap();
    let (alice, bob, _) = trio(&server).await;
    let b = bob.identity.public_key();
    for i in 0..200 {
        alice
            .client
            .enqueue(&[b], msg_id(i), vec![i as u8; 4000])
            .await
            .unwrap();
    }
    let h = server.connect().await.unwrap().health().await.unwrap();
    assert!(h.ok && h.store_reachable, "{h:?}");
    drop((alice, bob));

    server.stop();
    // Fold the write-ahead log into the database file, so that the page
    // damaged below is the one every read sees (a page still in the log
    // would be read from there).
    let db = server.data_dir().join("quicnprotochat.db");
    let key = std::fs::read_to_string(
        server
            .data_dir()
            .join(quicnprotochat_server::server::DEV_DB_KEY_FILE),
    )
    .unwrap();
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE;
    match quicnprotochat_core::sqlcipher::open_keyed(&db, flags, &format!("x'{}'", key.trim()))
        .unwrap()
    {
        quicnprotochat_core::sqlcipher::Opened::Open(c, _) => {
            c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap();
        }
        other => panic!("{other:?}"),
    }
    let mut bytes = std::fs::read(&db).unwrap();
    let pages = bytes.len() / 4096;
    assert!(pages > 100, "the queue fills pages: {pages}");
    // One byte of a page in the middle (page 1 stays intact, so the server
    // starts).
    bytes[(pages / 2) * 4096 + 200] ^= 0x01;
    std::fs::write(&db, &bytes).unwrap();

    server.restart().unwrap();
    let c = server.connect().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let health = loop {
        let h = c.health().await.unwrap();
        if !h.ok || tokio::time::Instant::now() > deadline {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        !health.ok,
        "a damaged store must make the server report not ready: {health:?}"
    );
    // The store itself still takes writes and reads: the probe is not what
    // failed.
    assert!(health.store_reachable, "{health:?}");
}

fn outgoing(to: &[IdentityKey], id: u64, payload: &[u8]) -> OutgoingMessage {
    OutgoingMessage {
        recipients: to.to_vec(),
        tokens: Vec::new(),
        message_id: msg_id(id),
        payload: payload.to_vec(),
    }
}

#[tokio::test]
async fn a_batch_stores_or_refuses_each_message_on_its_own_in_order() {
    let server = TestServer::start().unwrap();
    let (alice, bob, carol) = trio(&server).await;
    let (b, c) = (bob.identity.public_key(), carol.identity.public_key());
    let nobody = Identity::generate().unwrap().public_key();
    let outcomes = alice
        .client
        .enqueue_batch(vec![
            outgoing(&[b], 1, b"one"),
            outgoing(&[b, c], 2, b"two"),
            // the first message again: a retry inside the batch
            outgoing(&[b], 1, b"one"),
            outgoing(&[b, nobody], 3, b"to a stranger"),
            outgoing(&[b], 4, b""),
            outgoing(&[b, b], 5, b"twice"),
            outgoing(&[b], 6, b"three"),
        ])
        .await
        .unwrap();
    assert_eq!(outcomes.len(), 7);
    let mut outcomes = outcomes.into_iter();
    assert_eq!(
        outcomes.next().unwrap().unwrap(),
        EnqueueResult::Stored(vec![1])
    );
    assert_eq!(
        outcomes.next().unwrap().unwrap(),
        EnqueueResult::Stored(vec![2, 1])
    );
    assert_eq!(outcomes.next().unwrap().unwrap(), EnqueueResult::Duplicate);
    assert_code(outcomes.next().unwrap(), ServerErrorCode::NotFound);
    assert_code(outcomes.next().unwrap(), ServerErrorCode::InvalidArgument);
    assert_code(outcomes.next().unwrap(), ServerErrorCode::InvalidArgument);
    assert_eq!(
        outcomes.next().unwrap().unwrap(),
        EnqueueResult::Stored(vec![3])
    );
    // Each refused message stored nothing anywhere (the stranger's
    // message not even for bob); the stored ones arrived in batch order.
    let got = bob.client.fetch(1, 100).await.unwrap();
    assert_eq!(
        got.iter().map(|e| e.payload.as_slice()).collect::<Vec<_>>(),
        [&b"one"[..], b"two", b"three"]
    );
    assert_eq!(
        got.iter().map(|e| e.message_id.clone()).collect::<Vec<_>>(),
        [msg_id(1), msg_id(2), msg_id(6)].map(|id| id.to_vec())
    );
    assert_eq!(carol.client.fetch(1, 100).await.unwrap().len(), 1);
    // A batch retried whole after a lost answer stores nothing again.
    let again = alice
        .client
        .enqueue_batch(vec![outgoing(&[b], 2, b"two"), outgoing(&[b], 6, b"three")])
        .await
        .unwrap();
    assert!(
        again
            .iter()
            .all(|r| matches!(r, Ok(EnqueueResult::Duplicate))),
        "{again:?}"
    );
    assert_eq!(bob.client.fetch(1, 100).await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_batch_above_its_caps_is_refused_whole_and_stores_nothing() {
    let server = TestServer::start().unwrap();
    let (alice, bob, _carol) = trio(&server).await;
    let b = bob.identity.public_key();
    let too_many = (0..=MAX_ENQUEUE_BATCH as u64)
        .map(|i| outgoing(&[b], i, b"x"))
        .collect();
    assert_code(
        alice.client.enqueue_batch(too_many).await,
        ServerErrorCode::TooLarge,
    );
    // Recipients are counted over the whole batch: two messages of 600
    // are refused before any key is looked at.
    let crowd: Vec<IdentityKey> = (0..600)
        .map(|_| Identity::generate().unwrap().public_key())
        .collect();
    let mut first = crowd.clone();
    first[0] = b;
    assert!(2 * crowd.len() > MAX_BATCH_RECIPIENTS);
    assert_code(
        alice
            .client
            .enqueue_batch(vec![
                outgoing(&first, 100, b"x"),
                outgoing(&crowd, 101, b"x"),
            ])
            .await,
        ServerErrorCode::TooLarge,
    );
    assert_code(
        alice.client.enqueue_batch(Vec::new()).await,
        ServerErrorCode::InvalidArgument,
    );
    assert!(bob.client.fetch(1, 100).await.unwrap().is_empty());
    // Exactly at the cap is fine.
    let full: Vec<_> = (0..MAX_ENQUEUE_BATCH as u64)
        .map(|i| outgoing(&[b], 1000 + i, b"x"))
        .collect();
    let outcomes = alice.client.enqueue_batch(full).await.unwrap();
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    assert_eq!(
        bob.client.fetch(1, 1000).await.unwrap().len(),
        MAX_ENQUEUE_BATCH
    );
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn a_batch_that_fills_a_queue_stores_up_to_the_cap_and_loses_nothing() {
    let server = TestServer::start_with(|c| c.limits.queue_depth = 3).unwrap();
    let (alice, bob, carol) = trio(&server).await;
    let (b, c) = (bob.identity.public_key(), carol.identity.public_key());
    let outcomes = alice
        .client
        .enqueue_batch(
            (0..5u8)
                .map(|i| outgoing(&[b], u64::from(i), &[i + 1]))
                .chain([outgoing(&[c], 9, b"carol")])
                .collect(),
        )
        .await
        .unwrap();
    let stored: Vec<bool> = outcomes.iter().map(Result::is_ok).collect();
    assert_eq!(stored, [true, true, true, false, false, true]);
    assert_code(
        outcomes.into_iter().nth(3).unwrap(),
        ServerErrorCode::QueueFull,
    );
    assert_eq!(
        bob.client
            .fetch(0, 10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.payload[0])
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(carol.client.fetch(0, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_batch_counts_each_message_against_the_rate_limit() {
    let server = TestServer::start_with(|c| {
        c.limits.rates.enqueue_per_identity.per_second = 1;
        c.limits.rates.enqueue_per_identity.burst = 10;
    })
    .unwrap();
    let (alice, bob, _carol) = trio(&server).await;
    let b = bob.identity.public_key();
    let outcomes = alice
        .client
        .enqueue_batch((0..30).map(|i| outgoing(&[b], i, b"x")).collect())
        .await
        .unwrap();
    let stored = outcomes.iter().filter(|r| r.is_ok()).count();
    assert!((10..30).contains(&stored), "stored {stored}");
    let refused = outcomes.into_iter().find(Result::is_err).unwrap();
    match refused {
        Err(e) => assert!(e.rate_limited_for().is_some(), "{e}"),
        Ok(_) => unreachable!(),
    }
    assert_eq!(bob.client.fetch(1, 100).await.unwrap().len(), stored);
}

#[tokio::test]
async fn concurrent_sends_of_one_client_all_arrive_once_and_in_each_senders_order() {
    let server = TestServer::start().unwrap();
    let (alice, bob, _carol) = trio(&server).await;
    let b = bob.identity.public_key();
    // 8 tasks each send 25 messages one after the other, all at once: the
    // client gathers what waits into batches.
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let client = alice.client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25u64 {
                let id = t * 1000 + i;
                let r = client
                    .enqueue(&[b], msg_id(id), id.to_le_bytes().to_vec())
                    .await
                    .unwrap();
                assert!(matches!(r, EnqueueResult::Stored(_)), "{r:?}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 200 {
        let next = got.len() as u64 + 1;
        let batch = bob.client.fetch(next, 256).await.unwrap();
        assert!(!batch.is_empty(), "only {} of 200 arrived", got.len());
        got.extend(batch);
    }
    assert_eq!(got.len(), 200);
    let ids: Vec<u64> = got
        .iter()
        .map(|e| u64::from_le_bytes(e.payload[..8].try_into().unwrap()))
        .collect();
    let distinct: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), 200);
    for t in 0..8u64 {
        let mine: Vec<u64> = ids.iter().copied().filter(|id| id / 1000 == t).collect();
        assert_eq!(mine, (0..25).map(|i| t * 1000 + i).collect::<Vec<_>>());
    }
}
