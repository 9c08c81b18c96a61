//! Several server nodes on one PostgreSQL database: in-process servers and
//! real server processes on loopback port 0, each with a data directory of
//! its own, sharing a real database (a private cluster the tests start).

use std::collections::HashSet;
use std::time::Duration;

use quicnprotochat_client::harness::{PgCluster, PgTls, ServerProcess, TestServer, message_texts};
use quicnprotochat_client::{Client, ClientConfig};
use quicnprotochat_server::config::Secret;

use crate::support::msg_id;

fn node(url: &str) -> TestServer {
    let url = url.to_string();
    TestServer::start_with(move |c| c.database_url = Some(Secret(url))).unwrap()
}

/// Waits (up to `within`) until `server` reports `ready`.
async fn wait_ready(server: &TestServer, ready: bool, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let ok = match server.connect().await {
            Ok(c) => c.health().await.is_ok_and(|h| h.ok),
            Err(_) => false,
        };
        if ok == ready {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node did not report ready = {ready} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_subscriber_on_one_node_is_pushed_what_another_node_enqueues_in_order() {
    let db = PgCluster::shared().unwrap().database().await.unwrap();
    let (a, b) = (node(&db.url), node(&db.url));
    let alice = a.client("alice").await.unwrap();
    let bob = b.client("bob").await.unwrap();
    let to = [bob.identity.public_key()];
    let mut sub = bob.client.subscribe(1).await.unwrap();
    // Through the other node: only its announcement wakes bob's
    // subscription on node b.
    for i in 1..=30u64 {
        alice
            .client
            .enqueue(&to, msg_id(i), format!("m{i}").into_bytes())
            .await
            .unwrap();
    }
    for i in 1..=30u64 {
        let e = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap_or_else(|_| panic!("message {i} was not pushed"))
            .unwrap();
        assert_eq!((e.seq, e.payload), (i, format!("m{i}").into_bytes()));
    }
    // Then through bob's own node: the other node's announcement of these
    // is a duplicate wake and pushes nothing twice.
    for i in 31..=40u64 {
        bob.client
            .enqueue(&to, msg_id(i), format!("m{i}").into_bytes())
            .await
            .unwrap();
    }
    for i in 31..=40u64 {
        let e = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap_or_else(|_| panic!("message {i} was not pushed"))
            .unwrap();
        assert_eq!((e.seq, e.payload), (i, format!("m{i}").into_bytes()));
    }
    // Nothing pushed twice.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.next())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn after_the_database_restarts_nodes_serve_again_and_subscriptions_catch_up() {
    // A cluster of this test's own: it is stopped and started.
    let cluster = PgCluster::start().unwrap();
    let db = cluster.database().await.unwrap();
    let (a, b) = (node(&db.url), node(&db.url));
    let alice = a.client("alice").await.unwrap();
    let bob = b.client("bob").await.unwrap();
    let to = [bob.identity.public_key()];
    let mut sub = bob.client.subscribe(1).await.unwrap();
    alice
        .client
        .enqueue(&to, msg_id(1), b"before".to_vec())
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.seq, 1);

    // A stream of sends through node a, every 10 ms, while the database
    // stops and starts again: each is acknowledged or refused.
    let acked = std::cell::RefCell::new(Vec::new());
    let sending = std::cell::Cell::new(true);
    let sender = async {
        let mut i = 2u64;
        while sending.get() && i < 5_000 {
            let sent = alice
                .client
                .enqueue(&to, msg_id(i), format!("m{i}").into_bytes())
                .await;
            if sent.is_ok() {
                acked.borrow_mut().push(i);
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let outage = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.stop_server(false).unwrap();
        wait_ready(&a, false, Duration::from_secs(20)).await;
        wait_ready(&b, false, Duration::from_secs(20)).await;
        let during = acked.borrow().len();
        tokio::time::sleep(Duration::from_millis(500)).await;
        // While the database is down nothing is acknowledged.
        assert_eq!(acked.borrow().len(), during);
        cluster.start_server().unwrap();
        wait_ready(&a, true, Duration::from_secs(30)).await;
        wait_ready(&b, true, Duration::from_secs(30)).await;
        // Sends are acknowledged again.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while acked.borrow().len() < during + 20 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(during > 0 && acked.borrow().len() >= during + 20);
        sending.set(false);
    };
    tokio::join!(sender, outage);
    let acked = acked.into_inner();

    // Bob's subscription on node b, made before the outage, gets every
    // acknowledged message, once, in sequence order.
    let mut got: Vec<u64> = Vec::new();
    let mut next_seq = 2;
    while got.len() < acked.len() {
        let e = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {} pushed", got.len(), acked.len()))
            .unwrap();
        assert_eq!(e.seq, next_seq, "sequence numbers without gaps");
        next_seq += 1;
        let id = u64::from_le_bytes(e.message_id[..8].try_into().unwrap());
        assert_eq!(e.payload, format!("m{id}").into_bytes());
        assert!(!got.contains(&id), "message {id} pushed twice");
        got.push(id);
    }
    assert_eq!(got, acked);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.next())
            .await
            .is_err()
    );
}

/// A certificate authority and a server certificate for `localhost` it
/// signed: (CA PEM, server certificate PEM, server key PEM).
fn ca_and_server_cert() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test database CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn tls_to_the_database_verifies_its_certificate() {
    let (ca, cert_pem, key_pem) = ca_and_server_cert();
    let cluster = PgCluster::start_tls(&PgTls { cert_pem, key_pem }).unwrap();
    let db = cluster.database().await.unwrap();
    let name = db.url.rsplit("dbname=").next().unwrap().to_string();
    let port = cluster.tcp_port().unwrap();
    let url = format!("host=localhost port={port} user=postgres dbname={name}");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();

    // The right authority: the node serves, over TLS only.
    let server = {
        let (url, ca_file) = (url.clone(), ca_file.clone());
        TestServer::start_with(move |c| {
            c.database_url = Some(Secret(url));
            c.database_ca = Some(ca_file);
        })
        .unwrap()
    };
    let alice = server.client("alice").await.unwrap();
    alice
        .client
        .enqueue(&[alice.identity.public_key()], msg_id(1), b"x".to_vec())
        .await
        .unwrap();
    let (admin, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let rows = admin
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'quicnprotochat-server'",
            &[],
        )
        .await
        .unwrap();
    assert!(!rows.is_empty());
    assert!(
        rows.iter().all(|r| r.get::<_, bool>(0)),
        "a connection without TLS"
    );
    drop(admin);
    let _ = conn.await;

    // Another authority: the node refuses to start rather than talk to a
    // database it cannot authenticate.
    let (other_ca, _, _) = ca_and_server_cert();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, other_ca).unwrap();
    let refused = TestServer::start_with(move |c| {
        c.database_url = Some(Secret(url));
        c.database_ca = Some(other);
    });
    let e = refused.unwrap_err().to_string();
    assert!(
        e.contains("certificate") || e.contains("tls") || e.contains("TLS"),
        "{e}"
    );
}

/// Three server processes (the real binary) on one database, presenting
/// the first one's certificate.
fn three_processes(url: &str) -> [ServerProcess; 3] {
    let bin = env!("CARGO_BIN_EXE_quicnprotochat-server");
    let first =
        ServerProcess::start_with_env(bin, &[("QUICNPROTOCHAT_DATABASE_URL", url)]).unwrap();
    let cert = first.data_dir().join("dev-cert.pem");
    let key = first.data_dir().join("dev-key.pem");
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let other = || {
        ServerProcess::start_with_env(
            bin,
            &[
                ("QUICNPROTOCHAT_DATABASE_URL", url),
                ("QUICNPROTOCHAT_CERT", cert),
                ("QUICNPROTOCHAT_KEY", key),
            ],
        )
        .unwrap()
    };
    let (second, third) = (other(), other());
    [first, second, third]
}

/// A client configuration for the nodes in this order (the first is used
/// first).
fn nodes_in_order(nodes: &[ServerProcess; 3], order: [usize; 3]) -> ClientConfig {
    let mut c = nodes[0].client_config().unwrap().at(nodes[order[0]].addr());
    c.fallback_addrs = vec![nodes[order[1]].addr(), nodes[order[2]].addr()];
    c
}

#[tokio::test]
async fn three_node_processes_three_clients_one_group_survive_a_kill_9_of_a_node() {
    let db = PgCluster::shared().unwrap().database().await.unwrap();
    let mut nodes = three_processes(&db.url);
    let alice = nodes[0]
        .messenger_with("alice", nodes_in_order(&nodes, [0, 1, 2]))
        .await
        .unwrap();
    let bob = nodes[0]
        .messenger_with("bob", nodes_in_order(&nodes, [1, 2, 0]))
        .await
        .unwrap();
    let carol = nodes[0]
        .messenger_with("carol", nodes_in_order(&nodes, [2, 0, 1]))
        .await
        .unwrap();
    alice.invite("g", "bob").await.unwrap();
    alice.invite("g", "carol").await.unwrap();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    alice.sync().await.unwrap();
    bob.sync().await.unwrap();

    // Each writes 20 lines through its own node; alice's node is killed
    // (SIGKILL) while her sends are in flight.
    let lines = |who: &str| -> Vec<String> { (0..20).map(|i| format!("{who} {i}")).collect() };
    let (a_lines, b_lines, c_lines) = (lines("alice"), lines("bob"), lines("carol"));
    let sent = std::cell::Cell::new(0);
    let send_all = |m: &'static str| {
        let (messenger, texts) = match m {
            "alice" => (&alice, &a_lines),
            "bob" => (&bob, &b_lines),
            _ => (&carol, &c_lines),
        };
        let sent = &sent;
        async move {
            for t in texts {
                messenger.send("g", t).await.unwrap();
                if m == "alice" {
                    sent.set(sent.get() + 1);
                }
            }
        }
    };
    let killer = async {
        while sent.get() < 8 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        nodes[0].kill();
    };
    tokio::join!(
        send_all("alice"),
        send_all("bob"),
        send_all("carol"),
        killer
    );
    assert!(!nodes[0].is_running());

    // Every acknowledged line arrives once, each sender's in order.
    let by_sender = |texts: Vec<String>, who: &str| -> Vec<String> {
        texts.into_iter().filter(|t| t.starts_with(who)).collect()
    };
    for (reader, others) in [
        (&alice, [("bob", &b_lines), ("carol", &c_lines)]),
        (&bob, [("alice", &a_lines), ("carol", &c_lines)]),
        (&carol, [("alice", &a_lines), ("bob", &b_lines)]),
    ] {
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.extend(message_texts(reader.sync().await.unwrap()));
        }
        for (who, expected) in others {
            assert_eq!(&by_sender(seen.clone(), who), expected, "{who}'s lines");
        }
        assert_eq!(seen.len(), 40, "{seen:?}");
    }
}

#[tokio::test]
async fn concurrent_key_package_takes_through_three_node_processes_hand_each_out_once() {
    let db = PgCluster::shared().unwrap().database().await.unwrap();
    let nodes = three_processes(&db.url);
    let connect = |i: usize| {
        let config = nodes[0].client_config().unwrap().at(nodes[i].addr());
        async move {
            let identity = quicnprotochat_core::Identity::generate().unwrap();
            let client = Client::connect(config).await.unwrap();
            client.init_auth(&identity).await.unwrap();
            (client, identity)
        }
    };
    let (owner, owner_id) = connect(0).await;
    owner.register("owner").await.unwrap();
    let p = openmls_rust_crypto::OpenMlsRustCrypto::default();
    let mut batch: Vec<Vec<u8>> = (0..30)
        .map(|_| {
            quicnprotochat_core::keypackage::build(&p, &owner_id, "owner", false, 3600).unwrap()
        })
        .collect();
    batch.push(quicnprotochat_core::keypackage::build(&p, &owner_id, "owner", true, 3600).unwrap());
    assert_eq!(owner.publish_key_packages(batch).await.unwrap(), 31);
    let target = owner_id.public_key();
    let mut takers = Vec::new();
    for i in 0..3 {
        takers.push(connect(i).await.0);
    }
    let take_12 = |c: &Client| {
        let c = c.clone();
        async move {
            let mut got = Vec::new();
            for _ in 0..12 {
                got.push(c.fetch_key_package(target).await.unwrap());
            }
            got
        }
    };
    let (x, y, z) = tokio::join!(
        take_12(&takers[0]),
        take_12(&takers[1]),
        take_12(&takers[2])
    );
    let mut one_time = HashSet::new();
    let mut last_resort = 0;
    for (package, is_last_resort) in x.into_iter().chain(y).chain(z) {
        if is_last_resort {
            last_resort += 1;
        } else {
            assert!(
                one_time.insert(package),
                "a key package was handed out twice"
            );
        }
    }
    assert_eq!((one_time.len(), last_resort), (30, 6));
}

#[tokio::test]
async fn a_database_password_never_appears_in_an_error() {
    // Nothing listens on port 1: the node cannot reach the database.
    let url = "postgresql://quicnprotochat:Hunter2-never-shown@127.0.0.1:1/quicnprotochat";
    let e = TestServer::start_with(move |c| c.database_url = Some(Secret(url.into())))
        .unwrap_err()
        .to_string();
    assert!(e.contains("postgres"), "{e}");
    assert!(!e.contains("Hunter2"), "{e}");
    // Nor does a connection string that does not parse show its value.
    let bad = "postgresql://quicnprotochat:Hunter2-never-shown@127.0.0.1:notaport/q";
    let e =
        quicnprotochat_server::config::Config::from_toml_str(&format!("database_url = \"{bad}\""))
            .unwrap_err()
            .to_string();
    assert!(e.contains("database_url"), "{e}");
    assert!(!e.contains("Hunter2"), "{e}");
}
