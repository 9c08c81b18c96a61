//! The store conformance suite: every test runs unchanged against the
//! embedded SQLCipher store and against PostgreSQL (a real server: the one
//! `QUICNPROTOCHAT_TEST_DATABASE_URL` names, or a private cluster the tests
//! start).  A property that holds on one backend only fails here.
//!
//! Each test gets two handles, `a` and `b`: on PostgreSQL two stores with
//! pools of their own on one database, as two server nodes have; on the
//! embedded store (one node by design) both are the same store.  Tests that
//! race go through both.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use quicnprotochat_client::harness::{PgCluster, TestDatabase};
use quicnprotochat_core::IdentityKey;
use quicnprotochat_server::store::postgres::{PgOptions, PgStore};
use quicnprotochat_server::store::sqlite::{DB_FILE_NAME, DbKey, SqliteOptions, SqliteStore};
use quicnprotochat_server::store::{
    EnqueueOutcome, EnqueueRequest, KeyPackageStock, NewKeyPackage, Presented, PublishOutcome,
    QueueDepth, QueueInfo, RegisterOutcome, Store, StoreStats, Unregistered,
};

/// Two handles on one store, and what keeps the store alive.
struct Backend {
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
    kind: Kind,
}

enum Kind {
    Sqlite {
        path: PathBuf,
        _dir: tempfile::TempDir,
    },
    Postgres {
        db: TestDatabase,
    },
}

impl Backend {
    fn sqlite() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE_NAME);
        // Unencrypted, so that the suite can look into the file.
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(SqliteOptions::new(&path, DbKey::Unencrypted)).unwrap());
        Backend {
            a: store.clone(),
            b: store,
            kind: Kind::Sqlite { path, _dir: dir },
        }
    }

    async fn postgres() -> Backend {
        let db = PgCluster::shared().unwrap().database().await.unwrap();
        let a = PgStore::connect(PgOptions::new(&db.url)).await.unwrap();
        let b = PgStore::connect(PgOptions::new(&db.url)).await.unwrap();
        Backend {
            a: Arc::new(a),
            b: Arc::new(b),
            kind: Kind::Postgres { db },
        }
    }

    /// Stored payloads that no queued message refers to any more.
    async fn orphan_payloads(&self) -> i64 {
        const SQL: &str = "SELECT count(*) FROM payloads p WHERE p.refs <= 0
             OR NOT EXISTS (SELECT 1 FROM queue q WHERE q.payload_id = p.id)";
        match &self.kind {
            Kind::Sqlite { path, .. } => {
                let c = rusqlite::Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .unwrap();
                c.query_row(SQL, [], |r| r.get(0)).unwrap()
            }
            Kind::Postgres { db } => {
                let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                let conn = tokio::spawn(conn);
                let n: i64 = client.query_one(SQL, &[]).await.unwrap().get(0);
                drop(client);
                let _ = conn.await;
                n
            }
        }
    }
}

fn key(b: u8) -> IdentityKey {
    IdentityKey([b; 32])
}

fn enqueue_req(recipients: &[IdentityKey], id: u8, payload: &[u8], depth: u64) -> EnqueueRequest {
    EnqueueRequest {
        recipients: recipients.to_vec(),
        message_id: [id; 16],
        dedup_key: [id; 32],
        payload: payload.to_vec(),
        now_ms: 1_000,
        max_depth: depth,
        dedup_window_ms: 60_000,
        commit: None,
        presented: vec![Presented::Nothing; recipients.len()],
        sender_tag: [id; 16],
        stranger_depth: 1_000,
        stranger_per_sender: 100,
    }
}

/// A request with a 16-bit message id (for tests that send more than 255).
fn numbered(recipients: &[IdentityKey], n: u16, depth: u64) -> EnqueueRequest {
    let mut req = enqueue_req(recipients, 0, &n.to_be_bytes(), depth);
    req.message_id[..2].copy_from_slice(&n.to_be_bytes());
    req.dedup_key[..2].copy_from_slice(&n.to_be_bytes());
    req
}

async fn register_all(s: &dyn Store, keys: &[u8]) {
    for k in keys {
        assert_eq!(
            s.register(format!("user{k}"), key(*k)).await.unwrap(),
            RegisterOutcome::Registered
        );
    }
}

fn stored(out: &EnqueueOutcome) -> bool {
    matches!(out, EnqueueOutcome::Stored { .. })
}

/// Runs each named test against both backends.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlcipher {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::sqlite()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::postgres().await).await;
                }
            )*
        }
    };
}

conformance!(
    queue_sequences_ack_and_shared_payloads,
    one_commit_per_group_epoch,
    strangers_have_a_lane_beside_the_queue_and_a_share_of_it_each,
    full_queue_stores_nothing_for_anyone,
    concurrent_key_package_takes_hand_each_out_once,
    a_retry_is_dropped_until_its_key_expires_and_the_sweep_takes_only_expired_keys,
    concurrent_enqueues_through_both_nodes_number_each_queue_without_gaps,
    concurrent_retries_through_both_nodes_store_a_message_once,
    competing_commits_through_both_nodes_accept_one_per_epoch,
    registration_outcomes_and_a_contested_username,
    key_package_cap_last_resort_and_expiry,
    acknowledgements_racing_enqueues_lose_nothing_and_leave_no_orphans,
    sweeps_on_both_nodes_remove_each_expired_row_once,
    fetch_honours_its_limits_and_both_nodes_agree,
    queue_depth_counts_every_waiting_message_and_the_fullest_queue,
    the_operator_views_count_exactly_and_unregister_frees_a_username,
    batches_store_each_request_on_its_own_in_order_and_race_without_gaps,
);

async fn batches_store_each_request_on_its_own_in_order_and_race_without_gaps(s: Backend) {
    register_all(&*s.a, &[1, 2, 3]).await;
    // Refusals in between store nothing and keep the order of the rest.
    let outcomes: Vec<EnqueueOutcome> =
        s.a.enqueue_batch(vec![
            enqueue_req(&[key(1)], 1, b"a", 10_000),
            enqueue_req(&[key(1), key(9)], 2, b"to nobody", 10_000),
            enqueue_req(&[key(1)], 1, b"a again", 10_000),
            enqueue_req(&[key(1), key(2)], 3, b"b", 10_000),
        ])
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        outcomes,
        [
            EnqueueOutcome::Stored { seqs: vec![1] },
            EnqueueOutcome::UnknownRecipient { index: 1 },
            EnqueueOutcome::Duplicate,
            EnqueueOutcome::Stored { seqs: vec![2, 1] },
        ]
    );
    // The refused message left no idempotency key: it can be sent again.
    assert!(stored(
        &s.b.enqueue(enqueue_req(&[key(1)], 2, b"c", 10_000))
            .await
            .unwrap()
    ));
    // Batches racing through both nodes, to recipients in changing orders:
    // every queue numbered without gaps, each batch's messages to one
    // recipient in batch order.
    let sets: [&[u8]; 3] = [&[1, 2, 3], &[3, 2, 1], &[2, 3]];
    let mut tasks = Vec::new();
    for t in 0..12u16 {
        let node = if t % 2 == 0 { s.a.clone() } else { s.b.clone() };
        let batch: Vec<(Vec<IdentityKey>, EnqueueRequest)> = (0..8u16)
            .map(|i| {
                let set: Vec<IdentityKey> = sets[usize::from(t + i) % sets.len()]
                    .iter()
                    .map(|k| key(*k))
                    .collect();
                let req = numbered(&set, 1000 + t * 100 + i, 10_000);
                (set, req)
            })
            .collect();
        tasks.push(tokio::spawn(async move {
            let requests = batch.iter().map(|(_, r)| r.clone()).collect();
            let outcomes = node.enqueue_batch(requests).await.unwrap();
            (batch, outcomes)
        }));
    }
    let mut per_recipient: std::collections::HashMap<IdentityKey, Vec<u64>> = Default::default();
    for t in tasks {
        let (batch, outcomes) = t.await.unwrap();
        let mut last: std::collections::HashMap<IdentityKey, u64> = Default::default();
        for ((set, _), out) in batch.iter().zip(outcomes) {
            let EnqueueOutcome::Stored { seqs } = out.unwrap() else {
                panic!("a batch message was not stored")
            };
            for (r, seq) in set.iter().zip(seqs) {
                let before = last.insert(*r, seq).unwrap_or(0);
                assert!(seq > before, "batch order broken for {r:?}");
                per_recipient.entry(*r).or_default().push(seq);
            }
        }
    }
    for (r, mut seqs) in per_recipient {
        seqs.sort_unstable();
        let first = seqs[0];
        let expected: Vec<u64> = (first..first + seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "sequence numbers of {r:?}");
    }
}

async fn queue_depth_counts_every_waiting_message_and_the_fullest_queue(s: Backend) {
    let (a, b) = (&*s.a, &*s.b);
    let depth = |messages, largest| QueueDepth { messages, largest };
    assert_eq!(a.queue_depth().await.unwrap(), depth(0, 0));
    register_all(a, &[1, 2, 3]).await;
    for n in 0..5u16 {
        assert!(stored(
            &a.enqueue(numbered(&[key(1), key(2)], n, 100))
                .await
                .unwrap()
        ));
    }
    for n in 5..8u16 {
        assert!(stored(
            &b.enqueue(numbered(&[key(1)], n, 100)).await.unwrap()
        ));
    }
    // One payload for two recipients counts in each queue.
    assert_eq!(b.queue_depth().await.unwrap(), depth(13, 8));
    assert_eq!(a.ack(key(1), 4).await.unwrap(), 4);
    assert_eq!(a.queue_depth().await.unwrap(), depth(9, 5));
    assert_eq!(b.ack(key(2), 5).await.unwrap(), 5);
    assert_eq!(b.queue_depth().await.unwrap(), depth(4, 4));
}

async fn queue_sequences_ack_and_shared_payloads(s: Backend) {
    let (a, b) = (&*s.a, &*s.b);
    register_all(a, &[1, 2]).await;
    assert_eq!(
        a.enqueue(enqueue_req(&[key(1), key(9)], 9, b"x", 10))
            .await
            .unwrap(),
        EnqueueOutcome::UnknownRecipient { index: 1 }
    );
    let out = a
        .enqueue(enqueue_req(&[key(1), key(2)], 1, b"one", 10))
        .await
        .unwrap();
    assert_eq!(out, EnqueueOutcome::Stored { seqs: vec![1, 1] });
    let out = b
        .enqueue(enqueue_req(&[key(1)], 2, b"two", 10))
        .await
        .unwrap();
    assert_eq!(out, EnqueueOutcome::Stored { seqs: vec![2] });
    assert_eq!(
        a.enqueue(enqueue_req(&[key(1)], 2, b"two", 10))
            .await
            .unwrap(),
        EnqueueOutcome::Duplicate
    );
    let got = b.fetch(key(1), 1, 10, 1 << 20).await.unwrap();
    assert_eq!(
        got.iter().map(|m| m.payload.as_slice()).collect::<Vec<_>>(),
        [b"one".as_slice(), b"two"]
    );
    assert_eq!(got[0].message_id, vec![1; 16]);
    assert_eq!(got[0].enqueued_at_ms, 1_000);
    assert_eq!(a.ack(key(1), 1).await.unwrap(), 1);
    // key(2) still holds the shared payload of message 1.
    assert_eq!(
        b.fetch(key(2), 0, 10, 1 << 20).await.unwrap()[0].payload,
        b"one"
    );
    assert_eq!(b.ack(key(2), 5).await.unwrap(), 1);
    assert_eq!(b.ack(key(2), 5).await.unwrap(), 0);
    // Sequence numbers are never reused after acks.
    let out = a
        .enqueue(enqueue_req(&[key(2)], 3, b"three", 10))
        .await
        .unwrap();
    assert_eq!(out, EnqueueOutcome::Stored { seqs: vec![2] });
    assert_eq!(s.orphan_payloads().await, 0);
}

async fn one_commit_per_group_epoch(s: Backend) {
    let (a, b) = (&*s.a, &*s.b);
    register_all(a, &[1, 2]).await;
    let commit = |id: u8, group: &[u8], epoch: u64| EnqueueRequest {
        commit: Some((group.to_vec(), epoch)),
        ..enqueue_req(&[key(1)], id, b"commit", 10)
    };
    assert!(stored(&a.enqueue(commit(1, b"g", 5)).await.unwrap()));
    assert_eq!(
        b.enqueue(commit(2, b"g", 5)).await.unwrap(),
        EnqueueOutcome::StaleEpoch {
            last_commit_epoch: 5
        }
    );
    assert_eq!(
        a.enqueue(commit(3, b"g", 4)).await.unwrap(),
        EnqueueOutcome::StaleEpoch {
            last_commit_epoch: 5
        }
    );
    // Other groups and later epochs are independent.
    assert!(stored(&b.enqueue(commit(4, b"h", 5)).await.unwrap()));
    assert!(stored(&a.enqueue(commit(5, b"g", 6)).await.unwrap()));
    // A stale commit stored nothing.
    assert_eq!(a.fetch(key(1), 0, 10, 1 << 20).await.unwrap().len(), 3);
}

async fn strangers_have_a_lane_beside_the_queue_and_a_share_of_it_each(s: Backend) {
    let (a, b) = (&*s.a, &*s.b);
    register_all(a, &[1]).await;
    let (old, new) = ([0x0a; 32], [0x0b; 32]);
    let send = |id: u8, tag: u8, presented: Presented| {
        // Alternate the nodes.
        let node = if id.is_multiple_of(2) { a } else { b };
        node.enqueue(EnqueueRequest {
            presented: vec![presented],
            sender_tag: [tag; 16],
            stranger_depth: 3,
            stranger_per_sender: 2,
            ..enqueue_req(&[key(1)], id, b"m", 2)
        })
    };
    let stranger_full = EnqueueOutcome::QueueFull {
        index: 0,
        stranger: true,
    };
    // Without a delivery token every message counts alike.
    assert!(stored(&send(1, 7, Presented::Nothing).await.unwrap()));
    a.ack(key(1), 1).await.unwrap();
    a.set_delivery_token(key(1), old).await.unwrap();
    b.set_delivery_token(key(1), new).await.unwrap();
    // Two from one stranger, then its share is used up.
    assert!(stored(&send(2, 7, Presented::Nothing).await.unwrap()));
    assert!(stored(
        &send(3, 7, Presented::Token([0x0c; 32])).await.unwrap()
    ));
    assert_eq!(send(4, 7, Presented::Nothing).await.unwrap(), stranger_full);
    // Another stranger gets the rest of the lane.
    assert!(stored(&send(5, 8, Presented::Nothing).await.unwrap()));
    assert_eq!(send(6, 9, Presented::Nothing).await.unwrap(), stranger_full);
    // Members (the current or the previous token) still have the whole
    // queue, and the recipient's own messages count as a member's.
    assert!(stored(&send(7, 9, Presented::Token(new)).await.unwrap()));
    assert!(stored(&send(8, 9, Presented::Token(old)).await.unwrap()));
    assert_eq!(
        send(9, 9, Presented::Own).await.unwrap(),
        EnqueueOutcome::QueueFull {
            index: 0,
            stranger: false
        }
    );
    // Reading the queue frees both lanes.
    b.ack(key(1), 100).await.unwrap();
    assert!(stored(&send(10, 7, Presented::Nothing).await.unwrap()));
    assert!(stored(&send(11, 9, Presented::Own).await.unwrap()));
    // Setting the current token again keeps the previous one.
    a.set_delivery_token(key(1), new).await.unwrap();
    assert!(stored(&send(12, 9, Presented::Token(old)).await.unwrap()));
    b.ack(key(1), 100).await.unwrap();
    // A third token retires the first: it now counts as none.
    a.set_delivery_token(key(1), [0x0d; 32]).await.unwrap();
    assert!(stored(&send(13, 9, Presented::Token(new)).await.unwrap()));
    assert!(stored(&send(14, 9, Presented::Token(old)).await.unwrap()));
    assert!(stored(&send(15, 9, Presented::Token(old)).await.unwrap()));
    assert_eq!(
        send(16, 9, Presented::Token(old)).await.unwrap(),
        stranger_full
    );
}

async fn full_queue_stores_nothing_for_anyone(s: Backend) {
    let (a, b) = (&*s.a, &*s.b);
    register_all(a, &[1, 2]).await;
    a.enqueue(enqueue_req(&[key(2)], 1, b"a", 1)).await.unwrap();
    let out = b
        .enqueue(enqueue_req(&[key(1), key(2)], 2, b"b", 1))
        .await
        .unwrap();
    assert_eq!(
        out,
        EnqueueOutcome::QueueFull {
            index: 1,
            stranger: false
        }
    );
    assert!(a.fetch(key(1), 0, 10, 1 << 20).await.unwrap().is_empty());
    // The failed attempt did not burn the idempotency key, nor a sequence
    // number.
    a.ack(key(2), 1).await.unwrap();
    let out = a
        .enqueue(enqueue_req(&[key(1), key(2)], 2, b"b", 1))
        .await
        .unwrap();
    assert_eq!(out, EnqueueOutcome::Stored { seqs: vec![1, 2] });
}

async fn concurrent_key_package_takes_hand_each_out_once(s: Backend) {
    let pkgs: Vec<NewKeyPackage> = (0..50u8)
        .map(|i| NewKeyPackage {
            data: vec![i],
            hash_ref: vec![i],
            last_resort: false,
            not_after: 100,
        })
        .chain(std::iter::once(NewKeyPackage {
            data: b"lr".to_vec(),
            hash_ref: b"lr".to_vec(),
            last_resort: true,
            not_after: 100,
        }))
        .collect();
    assert_eq!(
        s.a.publish_key_packages(key(1), pkgs, 1000).await.unwrap(),
        PublishOutcome::Stored(51)
    );
    let mut tasks = Vec::new();
    for i in 0..80 {
        let node = if i % 2 == 0 { s.a.clone() } else { s.b.clone() };
        tasks.push(tokio::spawn(async move {
            node.take_key_package(key(1), 10).await.unwrap()
        }));
    }
    let mut seen = HashSet::new();
    let mut last_resort = 0;
    for t in tasks {
        let kp = t.await.unwrap().unwrap();
        if kp.last_resort {
            assert_eq!(kp.data, b"lr");
            last_resort += 1;
        } else {
            assert!(seen.insert(kp.data), "a key package was handed out twice");
        }
    }
    assert_eq!(seen.len(), 50);
    assert_eq!(last_resort, 30);
    assert_eq!(s.b.key_package_count(key(1), 10).await.unwrap(), (0, true));
    // Expired packages are never served.
    assert_eq!(s.a.take_key_package(key(1), 100).await.unwrap(), None);
}

fn at(now_ms: u64, req: EnqueueRequest) -> EnqueueRequest {
    EnqueueRequest { now_ms, ..req }
}

async fn a_retry_is_dropped_until_its_key_expires_and_the_sweep_takes_only_expired_keys(
    s: Backend,
) {
    let (a, b) = (&*s.a, &*s.b);
    register_all(a, &[1]).await;
    // Window 60 s: message 3 is remembered until 70 s, message 4 until 110 s.
    for (id, now) in [(3, 10_000), (4, 50_000)] {
        let out = a
            .enqueue(at(now, enqueue_req(&[key(1)], id, b"m", 10)))
            .await;
        assert!(stored(&out.unwrap()));
    }
    let retry = |node: &'static str, id, now| {
        let node = if node == "a" { a } else { b };
        node.enqueue(at(now, enqueue_req(&[key(1)], id, b"m", 10)))
    };
    assert_eq!(
        retry("b", 3, 69_999).await.unwrap(),
        EnqueueOutcome::Duplicate
    );
    let stats = b.sweep(0, 80_000).await.unwrap();
    assert_eq!(stats.dedup_keys, 1, "only message 3's key had expired");
    assert_eq!(
        retry("a", 4, 90_000).await.unwrap(),
        EnqueueOutcome::Duplicate
    );
    assert!(stored(&retry("b", 3, 90_000).await.unwrap()));
    assert_eq!(
        retry("a", 3, 90_001).await.unwrap(),
        EnqueueOutcome::Duplicate
    );
}

async fn concurrent_enqueues_through_both_nodes_number_each_queue_without_gaps(s: Backend) {
    register_all(&*s.a, &[1, 2, 3]).await;
    const N: u16 = 120;
    // Three recipients in changing orders and subsets: transactions that
    // lock the same queues in different request orders must neither
    // deadlock nor skip or reuse a number.
    let sets: [&[u8]; 4] = [&[1, 2, 3], &[3, 2, 1], &[2, 1], &[3, 1]];
    let mut tasks = Vec::new();
    for n in 0..N {
        let node = if n % 2 == 0 { s.a.clone() } else { s.b.clone() };
        let set: Vec<IdentityKey> = sets[usize::from(n) % sets.len()]
            .iter()
            .map(|k| key(*k))
            .collect();
        tasks.push(tokio::spawn(async move {
            let out = node.enqueue(numbered(&set, n, 10_000)).await.unwrap();
            (set, out)
        }));
    }
    let mut per_recipient: std::collections::HashMap<IdentityKey, Vec<u64>> = Default::default();
    for t in tasks {
        let (set, out) = t.await.unwrap();
        let EnqueueOutcome::Stored { seqs } = out else {
            panic!("{out:?}")
        };
        for (r, seq) in set.iter().zip(seqs) {
            per_recipient.entry(*r).or_default().push(seq);
        }
    }
    for (r, mut seqs) in per_recipient {
        seqs.sort_unstable();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "sequence numbers of {r:?}");
        // What is fetched is what was numbered, in order, once each.
        let fetched = s.b.fetch(r, 1, 1_000, 1 << 24).await.unwrap();
        assert_eq!(fetched.iter().map(|m| m.seq).collect::<Vec<_>>(), expected);
    }
}

async fn concurrent_retries_through_both_nodes_store_a_message_once(s: Backend) {
    register_all(&*s.a, &[1, 2]).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let node = if i % 2 == 0 { s.a.clone() } else { s.b.clone() };
        tasks.push(tokio::spawn(async move {
            node.enqueue(enqueue_req(&[key(1), key(2)], 7, b"once", 10))
                .await
                .unwrap()
        }));
    }
    let mut stored_count = 0;
    for t in tasks {
        match t.await.unwrap() {
            EnqueueOutcome::Stored { seqs } => {
                assert_eq!(seqs, vec![1, 1]);
                stored_count += 1;
            }
            EnqueueOutcome::Duplicate => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(stored_count, 1);
    for r in [key(1), key(2)] {
        assert_eq!(s.a.fetch(r, 0, 10, 1 << 20).await.unwrap().len(), 1);
    }
}

async fn competing_commits_through_both_nodes_accept_one_per_epoch(s: Backend) {
    register_all(&*s.a, &[1]).await;
    for epoch in 1..=5u64 {
        let mut tasks = Vec::new();
        for i in 0..6u8 {
            let node = if i % 2 == 0 { s.a.clone() } else { s.b.clone() };
            let id = u8::try_from(epoch).unwrap() * 10 + i;
            tasks.push(tokio::spawn(async move {
                node.enqueue(EnqueueRequest {
                    commit: Some((b"group".to_vec(), epoch)),
                    ..enqueue_req(&[key(1)], id, b"commit", 100)
                })
                .await
                .unwrap()
            }));
        }
        let mut accepted = 0;
        for t in tasks {
            match t.await.unwrap() {
                EnqueueOutcome::Stored { .. } => accepted += 1,
                EnqueueOutcome::StaleEpoch { last_commit_epoch } => {
                    assert_eq!(last_commit_epoch, epoch)
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(accepted, 1, "epoch {epoch}");
    }
    assert_eq!(s.b.fetch(key(1), 0, 100, 1 << 20).await.unwrap().len(), 5);
}

async fn registration_outcomes_and_a_contested_username(s: Backend) {
    let (a, b) = (&*s.a, &*s.b);
    assert_eq!(
        a.register("alice".into(), key(1)).await.unwrap(),
        RegisterOutcome::Registered
    );
    assert_eq!(
        b.register("alice".into(), key(1)).await.unwrap(),
        RegisterOutcome::AlreadyRegistered
    );
    assert_eq!(
        b.register("alice".into(), key(2)).await.unwrap(),
        RegisterOutcome::UsernameTaken
    );
    assert_eq!(
        a.register("alice2".into(), key(1)).await.unwrap(),
        RegisterOutcome::IdentityTaken
    );
    assert_eq!(b.resolve("alice".into()).await.unwrap(), Some(key(1)));
    assert_eq!(a.resolve("nobody".into()).await.unwrap(), None);
    // Ten identities race for one name through both nodes: one gets it.
    let mut tasks = Vec::new();
    for i in 10..20u8 {
        let node = if i % 2 == 0 { s.a.clone() } else { s.b.clone() };
        tasks.push(tokio::spawn(async move {
            (i, node.register("carol".into(), key(i)).await.unwrap())
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (i, out) = t.await.unwrap();
        match out {
            RegisterOutcome::Registered => winners.push(i),
            RegisterOutcome::UsernameTaken => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(winners.len(), 1);
    assert_eq!(
        a.resolve("carol".into()).await.unwrap(),
        Some(key(winners[0]))
    );
}

async fn key_package_cap_last_resort_and_expiry(s: Backend) {
    let (a, b) = (&*s.a, &*s.b);
    let kp = |i: u8, last_resort: bool, not_after: u64| NewKeyPackage {
        data: vec![i; 3],
        hash_ref: vec![i; 4],
        last_resort,
        not_after,
    };
    assert_eq!(
        a.publish_key_packages(key(1), vec![kp(1, false, 100), kp(2, false, 50)], 3)
            .await
            .unwrap(),
        PublishOutcome::Stored(2)
    );
    // Republishing a stored package is skipped; the cap counts only new ones.
    assert_eq!(
        b.publish_key_packages(key(1), vec![kp(1, false, 100), kp(3, false, 100)], 3)
            .await
            .unwrap(),
        PublishOutcome::Stored(1)
    );
    assert_eq!(
        a.publish_key_packages(key(1), vec![kp(4, false, 100)], 3)
            .await
            .unwrap(),
        PublishOutcome::OverCap { have: 3 }
    );
    // The last-resort package does not count against the cap, and a new one
    // replaces the old.
    assert_eq!(
        b.publish_key_packages(key(1), vec![kp(5, true, 100)], 3)
            .await
            .unwrap(),
        PublishOutcome::Stored(1)
    );
    assert_eq!(
        a.publish_key_packages(key(1), vec![kp(6, true, 100)], 3)
            .await
            .unwrap(),
        PublishOutcome::Stored(1)
    );
    assert_eq!(a.key_package_count(key(1), 10).await.unwrap(), (3, true));
    // Package 2 expires at 50: at 60 it is neither counted nor served.
    assert_eq!(b.key_package_count(key(1), 60).await.unwrap(), (2, true));
    let mut taken = Vec::new();
    for _ in 0..2 {
        let t = a.take_key_package(key(1), 60).await.unwrap().unwrap();
        assert!(!t.last_resort);
        taken.push(t.data[0]);
    }
    taken.sort_unstable();
    assert_eq!(taken, [1, 3]);
    let t = b.take_key_package(key(1), 60).await.unwrap().unwrap();
    assert_eq!((t.data, t.last_resort), (vec![6; 3], true));
    // The last-resort package is kept.
    assert_eq!(a.key_package_count(key(1), 60).await.unwrap(), (0, true));
    // Another identity's directory is separate.
    assert_eq!(a.take_key_package(key(2), 0).await.unwrap(), None);
    let swept = b.sweep(60, 0).await.unwrap();
    assert_eq!(swept.key_packages, 1, "package 2 had expired");
}

async fn acknowledgements_racing_enqueues_lose_nothing_and_leave_no_orphans(s: Backend) {
    register_all(&*s.a, &[1, 2]).await;
    const N: u16 = 60;
    // Both recipients share every payload; each acknowledges through the
    // other node while messages keep arriving.
    let sender = {
        let (a, b) = (s.a.clone(), s.b.clone());
        tokio::spawn(async move {
            for n in 0..N {
                let node = if n % 2 == 0 { &a } else { &b };
                let out = node.enqueue(numbered(&[key(1), key(2)], n, 10_000)).await;
                assert!(stored(&out.unwrap()));
                tokio::task::yield_now().await;
            }
        })
    };
    let reader = |r: IdentityKey, node: Arc<dyn Store>| {
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut next = 1;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
            while tokio::time::Instant::now() < deadline {
                let got = node.fetch(r, next, 7, 1 << 20).await.unwrap();
                if let Some(last) = got.last() {
                    next = last.seq + 1;
                    let acked = node.ack(r, last.seq).await.unwrap();
                    assert_eq!(acked as usize, got.len());
                    seen.extend(got.into_iter().map(|m| m.seq));
                }
                if seen.len() == usize::from(N) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            seen
        })
    };
    let r1 = reader(key(1), s.b.clone());
    let r2 = reader(key(2), s.a.clone());
    sender.await.unwrap();
    let expected: Vec<u64> = (1..=u64::from(N)).collect();
    assert_eq!(r1.await.unwrap(), expected);
    assert_eq!(r2.await.unwrap(), expected);
    assert_eq!(s.orphan_payloads().await, 0);
    assert!(s.a.fetch(key(1), 0, 10, 1 << 20).await.unwrap().is_empty());
}

async fn sweeps_on_both_nodes_remove_each_expired_row_once(s: Backend) {
    register_all(&*s.a, &[1]).await;
    for n in 0..30u16 {
        assert!(stored(
            &s.a.enqueue(at(1_000, numbered(&[key(1)], n, 100)))
                .await
                .unwrap()
        ));
    }
    let (x, y) = tokio::join!(s.a.sweep(0, 100_000), s.b.sweep(0, 100_000));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.dedup_keys + y.dedup_keys, 30);
    // Sweeping removes idempotency keys, never queued messages.
    assert_eq!(s.a.fetch(key(1), 0, 100, 1 << 20).await.unwrap().len(), 30);
}

async fn fetch_honours_its_limits_and_both_nodes_agree(s: Backend) {
    let (a, b) = (&*s.a, &*s.b);
    register_all(a, &[1]).await;
    for n in 0..10u16 {
        let mut req = numbered(&[key(1)], n, 100);
        req.payload = vec![u8::try_from(n).unwrap(); 1000];
        assert!(stored(&a.enqueue(req).await.unwrap()));
    }
    assert_eq!(b.fetch(key(1), 1, 4, 1 << 20).await.unwrap().len(), 4);
    // The byte budget stops the batch, but never below one message.
    assert_eq!(b.fetch(key(1), 1, 10, 2500).await.unwrap().len(), 3);
    assert_eq!(a.fetch(key(1), 1, 10, 1).await.unwrap().len(), 1);
    let tail = b.fetch(key(1), 8, 10, 1 << 20).await.unwrap();
    assert_eq!(tail.iter().map(|m| m.seq).collect::<Vec<_>>(), [8, 9, 10]);
    assert!(b.fetch(key(1), 11, 10, 1 << 20).await.unwrap().is_empty());
    // One store: one incarnation, whichever node is asked; and the probe
    // writes and reads through each.
    assert_eq!(a.incarnation(), b.incarnation());
    a.ping().await.unwrap();
    b.ping().await.unwrap();
}

/// What `admin` shows: totals, the deepest queues, the key-package stock
/// (expired packages left out), and what `unregister` removes and keeps.
async fn the_operator_views_count_exactly_and_unregister_frees_a_username(s: Backend) {
    let (a, b) = (&*s.a, &*s.b);
    register_all(a, &[1, 2, 3]).await;
    let kp = |i: u8, last_resort: bool, not_after: u64| NewKeyPackage {
        data: vec![i; 3],
        hash_ref: vec![i; 4],
        last_resort,
        not_after,
    };
    let publish = |who: u8, packages: Vec<NewKeyPackage>| async move {
        assert!(matches!(
            a.publish_key_packages(key(who), packages, 100)
                .await
                .unwrap(),
            PublishOutcome::Stored(_)
        ));
    };
    publish(
        1,
        vec![
            kp(1, false, 100),
            kp(2, false, 100),
            kp(3, false, 100),
            kp(4, true, 100),
        ],
    )
    .await;
    // Package 6 has expired at 60: never counted.
    publish(2, vec![kp(5, false, 100), kp(6, false, 50)]).await;
    // An identity with key packages and no username.
    publish(4, vec![kp(7, false, 100), kp(8, false, 100)]).await;
    // One with only a delivery token.
    b.set_delivery_token(key(5), [9; 32]).await.unwrap();
    let at = |now_ms: u64, req: EnqueueRequest| EnqueueRequest { now_ms, ..req };
    assert!(stored(
        &a.enqueue(at(1_000, enqueue_req(&[key(1)], 1, &[0; 10], 10)))
            .await
            .unwrap()
    ));
    assert!(stored(
        &b.enqueue(at(2_000, enqueue_req(&[key(1)], 2, &[0; 10], 10)))
            .await
            .unwrap()
    ));
    // One payload for two recipients: its bytes count once.
    assert!(stored(
        &a.enqueue(at(3_000, enqueue_req(&[key(1), key(2)], 3, &[0; 5], 10)))
            .await
            .unwrap()
    ));
    let expected = StoreStats {
        identities: 5,
        usernames: 3,
        queues: 2,
        messages: 4,
        payload_bytes: 25,
        key_packages: 6,
        last_resort_key_packages: 1,
    };
    assert_eq!(a.stats(60).await.unwrap(), expected);
    assert_eq!(b.stats(60).await.unwrap(), expected);

    let queues = |limit| async move { b.largest_queues(limit).await.unwrap() };
    assert_eq!(
        queues(10).await,
        [
            QueueInfo {
                recipient: key(1),
                depth: 3,
                oldest_enqueued_at_ms: 1_000
            },
            QueueInfo {
                recipient: key(2),
                depth: 1,
                oldest_enqueued_at_ms: 3_000
            },
        ]
    );
    assert_eq!(queues(1).await.len(), 1);

    let stock =
        |who: u8, username: Option<&str>, one_time: u64, last_resort: bool| KeyPackageStock {
            identity: key(who),
            username: username.map(str::to_string),
            one_time,
            last_resort,
        };
    assert_eq!(
        a.key_package_stock(60, 10).await.unwrap(),
        [
            stock(3, Some("user3"), 0, false),
            stock(2, Some("user2"), 1, false),
            stock(4, None, 2, false),
            stock(1, Some("user1"), 3, true),
        ]
    );
    assert_eq!(b.key_package_stock(60, 2).await.unwrap().len(), 2);

    assert_eq!(
        b.unregister("user1".into()).await.unwrap(),
        Some(Unregistered {
            identity: key(1),
            key_packages: 4
        })
    );
    assert_eq!(a.unregister("user1".into()).await.unwrap(), None);
    assert_eq!(a.unregister("nobody".into()).await.unwrap(), None);
    assert_eq!(a.resolve("user1".into()).await.unwrap(), None);
    assert_eq!(a.take_key_package(key(1), 60).await.unwrap(), None);
    // Its queue stays, with the payload it shares with user2's.
    let kept = a.fetch(key(1), 0, 10, 1 << 20).await.unwrap();
    assert_eq!(kept.len(), 3);
    assert_eq!(b.fetch(key(2), 0, 10, 1 << 20).await.unwrap().len(), 1);
    // New messages to it are refused; the username is free for anyone.
    assert!(matches!(
        b.enqueue(enqueue_req(&[key(1)], 9, b"late", 10))
            .await
            .unwrap(),
        EnqueueOutcome::UnknownRecipient { index: 0 }
    ));
    assert_eq!(
        a.register("user1".into(), key(6)).await.unwrap(),
        RegisterOutcome::Registered
    );
    let after = b.stats(60).await.unwrap();
    assert_eq!(
        (
            after.identities,
            after.usernames,
            after.messages,
            after.key_packages
        ),
        (6, 3, 4, 3)
    );
    // Its owner acknowledges its queue as before.
    assert_eq!(a.ack(key(1), 3).await.unwrap(), 3);
    assert_eq!(s.orphan_payloads().await, 0);
}
