//! Authentication: token, proof of possession bound to the connection,
//! version checks, deadlines and rate limits.

use std::sync::Arc;
use std::time::Duration;

use quicnprotochat_client::harness::TestServer;
use quicnprotochat_client::{Client, ClientError, ServerErrorCode};
use quicnprotochat_core::Identity;
use quicnprotochat_core::clock::ManualClock;

use crate::support::{anonymous, assert_code, assert_still_serving, msg_id, raw_connection};

#[tokio::test]
async fn health_needs_no_authentication() {
    let server = TestServer::start().unwrap();
    let c = anonymous(&server).await;
    let h = c.health().await.unwrap();
    assert!(h.ok);
    assert!(h.store_reachable);
    assert_eq!(h.wire_version, quicnprotochat_proto::WIRE_VERSION);
    assert_eq!(h.server_version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn session_calls_before_authentication_are_typed_errors() {
    let server = TestServer::start().unwrap();
    let c = anonymous(&server).await;
    assert!(matches!(
        c.register("alice").await,
        Err(ClientError::NotAuthenticated)
    ));
    assert!(matches!(
        c.fetch(1, 10).await,
        Err(ClientError::NotAuthenticated)
    ));
    assert!(matches!(
        c.key_package_count().await,
        Err(ClientError::NotAuthenticated)
    ));
}

#[tokio::test]
async fn wrong_or_empty_token_is_refused() {
    let server = TestServer::start().unwrap();
    for token in [b"wrong-token".to_vec(), Vec::new()] {
        let mut cfg = server.client_config();
        cfg.access_token = token;
        let c = Client::connect(cfg).await.unwrap();
        let id = Identity::generate().unwrap();
        assert_code(c.init_auth(&id).await, ServerErrorCode::Unauthenticated);
        assert!(matches!(
            c.register("mallory").await,
            Err(ClientError::NotAuthenticated)
        ));
    }
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn forged_identity_proof_is_refused() {
    let server = TestServer::start().unwrap();
    let c = anonymous(&server).await;
    let victim = Identity::generate().unwrap();
    let attacker = Identity::generate().unwrap();
    let ch = c.auth_challenge().await.unwrap();
    // Signed by the attacker, claiming the victim's key.
    let sig = attacker.sign(&ch.transcript(&victim.public_key())).unwrap();
    assert_code(
        c.auth_respond(victim.public_key(), sig).await,
        ServerErrorCode::Unauthenticated,
    );
    // Garbage signature of the right length.
    let ch = c.auth_challenge().await.unwrap();
    let _ = ch;
    assert_code(
        c.auth_respond(victim.public_key(), vec![0; 64]).await,
        ServerErrorCode::Unauthenticated,
    );
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn a_captured_proof_is_useless_on_another_connection_and_single_use_on_its_own() {
    let server = TestServer::start().unwrap();
    let id = Identity::generate().unwrap();
    let key = id.public_key();

    // Connection A authenticates; the attacker captures the signature.
    let a = anonymous(&server).await;
    let ch_a = a.auth_challenge().await.unwrap();
    let captured = id.sign(&ch_a.transcript(&key)).unwrap();
    a.auth_respond(key, captured.clone()).await.unwrap();

    // Replayed on connection B (fresh nonce, different TLS exporter): refused.
    let b = anonymous(&server).await;
    let ch_b = b.auth_challenge().await.unwrap();
    assert_ne!(
        ch_a.exporter, ch_b.exporter,
        "exporters must differ per connection"
    );
    assert_code(
        b.auth_respond(key, captured.clone()).await,
        ServerErrorCode::Unauthenticated,
    );

    // On connection C, a proof for the nonce is accepted once only: a failed
    // attempt consumes the nonce, so the right signature afterwards fails too.
    let c = anonymous(&server).await;
    let ch_c = c.auth_challenge().await.unwrap();
    assert_code(
        c.auth_respond(key, vec![1; 64]).await,
        ServerErrorCode::Unauthenticated,
    );
    let good = id.sign(&ch_c.transcript(&key)).unwrap();
    assert_code(
        c.auth_respond(key, good).await,
        ServerErrorCode::Unauthenticated,
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_minor_version_outside_the_servers_range_is_refused_with_a_typed_error() {
    use quicnprotochat_proto::capnp_rpc::RpcSystem;
    use quicnprotochat_proto::rpc::{Side, default_frame_limits, rpc_system};
    use quicnprotochat_proto::schema::{ErrorCode, service};

    let server = TestServer::start().unwrap();
    tokio::task::LocalSet::new()
        .run_until(async {
            let (_ep, conn) = raw_connection(&server).await;
            let (send, recv) = conn.open_bi().await.unwrap();
            let mut rpc: RpcSystem<Side> =
                rpc_system(recv, send, Side::Client, None, default_frame_limits());
            let svc: service::Client = rpc.bootstrap(Side::Server);
            tokio::task::spawn_local(rpc);
            for version in [0, quicnprotochat_proto::WIRE_VERSION + 1, u16::MAX] {
                let mut req = svc.challenge_request();
                req.get().set_wire_version(version);
                let resp = req.send().promise.await.unwrap();
                let r = resp.get().unwrap();
                assert!(r.has_error(), "version {version} must be refused");
                let e = r.get_error().unwrap();
                assert_eq!(e.get_code().unwrap(), ErrorCode::VersionMismatch);
                let message = e.get_message().unwrap().to_string().unwrap();
                assert!(message.contains("wire version"), "{message}");
                assert!(r.get_nonce().unwrap().is_empty());
            }
        })
        .await;
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn a_client_newer_than_the_server_logs_in_at_the_servers_minor_version() {
    let server = TestServer::start().unwrap();
    let bob = server.client("bob").await.unwrap();
    let mut cfg = server.client_config();
    cfg.wire_version = quicnprotochat_proto::WIRE_VERSION + 1;
    let newer = Client::connect(cfg).await.unwrap();
    let id = Identity::generate().unwrap();
    newer.init_auth(&id).await.unwrap();
    assert_eq!(
        newer.wire_version().await.unwrap(),
        quicnprotochat_proto::WIRE_VERSION
    );
    newer.register("newer").await.unwrap();
    // Sends, single and batched, reach bob.
    let bob_key = [bob.identity.public_key()];
    newer
        .enqueue(&bob_key, msg_id(1), b"one".to_vec())
        .await
        .unwrap();
    let sends = (2..=5).map(|n| newer.enqueue(&bob_key, msg_id(n), vec![b'x'; n as usize]));
    for r in futures::future::join_all(sends).await {
        r.unwrap();
    }
    let got = bob.client.fetch(0, 10).await.unwrap();
    assert_eq!(got.len(), 5);
    assert_eq!(got[0].payload, b"one");
}

#[tokio::test]
async fn a_client_below_every_minor_version_gets_the_typed_refusal() {
    let server = TestServer::start().unwrap();
    let mut cfg = server.client_config();
    cfg.wire_version = 0;
    let c = Client::connect(cfg).await.unwrap();
    let id = Identity::generate().unwrap();
    match c.init_auth(&id).await {
        Err(ClientError::Server {
            code: ServerErrorCode::VersionMismatch,
            message,
            ..
        }) => {
            assert!(message.contains("wire version"), "{message}");
        }
        other => panic!("expected VersionMismatch, got {other:?}"),
    }
    assert_eq!(c.wire_version().await.unwrap(), 0);
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn another_major_version_fails_the_handshake_without_hanging() {
    let server = TestServer::start().unwrap();
    let mut cfg = server.client_config();
    cfg.alpn = b"quicnprotochat/2".to_vec();
    let r = tokio::time::timeout(Duration::from_secs(5), Client::connect(cfg))
        .await
        .expect("no hang");
    match r {
        Err(ClientError::Connect { reason, .. }) => {
            assert!(
                reason.to_lowercase().contains("alpn") || reason.contains("120"),
                "{reason}"
            )
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn a_client_that_never_authenticates_is_cut_off() {
    let server = TestServer::start_with(|c| c.limits.auth_timeout_secs = 1).unwrap();
    let idle = anonymous(&server).await;
    idle.health().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let r = tokio::time::timeout(Duration::from_secs(5), idle.health())
        .await
        .expect("no hang");
    assert!(
        r.is_err(),
        "unauthenticated connection must be closed, got {r:?}"
    );
    // An authenticated client on the same server is unaffected by the deadline.
    let ok = server.client("alice").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    ok.client.health().await.unwrap();
}

#[tokio::test]
async fn authentication_attempts_are_rate_limited_per_address() {
    let server = TestServer::start_with(|c| {
        c.limits.rates.auth_per_ip.per_second = 1;
        c.limits.rates.auth_per_ip.burst = 4;
    })
    .unwrap();
    let c = anonymous(&server).await;
    let mut limited = None;
    for _ in 0..20 {
        match c.auth_challenge().await {
            Ok(_) => {}
            Err(e) => {
                limited = Some(e);
                break;
            }
        }
    }
    match limited {
        Some(ClientError::Server {
            code: ServerErrorCode::RateLimited,
            retry_after,
            ..
        }) => {
            let after = retry_after.expect("retry_after is set");
            assert!(
                after > Duration::ZERO && after <= Duration::from_secs(1),
                "{after:?}"
            );
        }
        other => panic!("expected RateLimited within 20 attempts, got {other:?}"),
    }
}

#[tokio::test]
async fn connection_flood_from_one_address_is_capped() {
    let server = TestServer::start_with(|c| c.limits.max_connections_per_ip = 3).unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(anonymous(&server).await);
    }
    let extra = tokio::time::timeout(Duration::from_secs(5), server.connect())
        .await
        .expect("no hang");
    assert!(
        extra.is_err(),
        "4th connection from one address must be refused"
    );
    drop(held);
    // Slots free up once connections close.
    let mut ok = None;
    for _ in 0..50 {
        if let Ok(c) = server.connect().await {
            ok = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ok.expect("a connection is accepted again after the others closed")
        .health()
        .await
        .unwrap();
}

#[tokio::test]
async fn usernames_are_unique_and_resolve() {
    let server = TestServer::start().unwrap();
    let alice = server.client("alice").await.unwrap();
    let bob = server.client("bob").await.unwrap();
    assert_eq!(
        bob.client.resolve("alice").await.unwrap(),
        alice.identity.public_key()
    );
    // Idempotent for the same pair.
    alice.client.register("alice").await.unwrap();
    assert_code(
        bob.client.register("alice").await,
        ServerErrorCode::Conflict,
    );
    assert_code(
        alice.client.register("alice2").await,
        ServerErrorCode::Conflict,
    );
    assert_code(
        bob.client.resolve("nobody").await,
        ServerErrorCode::NotFound,
    );
    for bad in ["", "Alice", "-x", "a b", &"x".repeat(33)] {
        assert_code(
            bob.client.resolve(bad).await,
            ServerErrorCode::InvalidArgument,
        );
    }
}

#[tokio::test]
async fn authentication_attempts_are_rate_limited_per_claimed_identity() {
    let server = TestServer::start_with(|c| {
        c.limits.rates.auth_per_identity.per_second = 1;
        c.limits.rates.auth_per_identity.burst = 3;
    })
    .unwrap();
    let victim = Identity::generate().unwrap();
    let attacker = Identity::generate().unwrap();
    let mut limited = false;
    // Each attempt on a fresh connection (the per-IP bucket is not the one that bites).
    for _ in 0..10 {
        let c = anonymous(&server).await;
        let ch = c.auth_challenge().await.unwrap();
        let forged = attacker.sign(&ch.transcript(&victim.public_key())).unwrap();
        match c.auth_respond(victim.public_key(), forged).await {
            Err(ClientError::Server {
                code: ServerErrorCode::RateLimited,
                ..
            }) => {
                limited = true;
                break;
            }
            Err(ClientError::Server {
                code: ServerErrorCode::Unauthenticated,
                ..
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        limited,
        "attempts against one identity must be rate limited"
    );
    // Other identities are unaffected.
    server.client("alice").await.unwrap();
}

/// The eight points of small order (canonical encodings), a non-canonical
/// identity (y = p + 1) and the identity with a "negative zero" x: keys with
/// no private key behind them, under which plain Ed25519 accepts crafted
/// signatures.
const WEAK_KEYS: [&str; 10] = [
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0100000000000000000000000000000000000000000000000000000000000080",
];

#[tokio::test]
async fn weak_identity_keys_never_authenticate_even_with_signatures_plain_ed25519_accepts() {
    let server = TestServer::start_with(|c| {
        c.limits.rates.auth_per_ip.burst = 10_000;
        c.limits.rates.auth_per_ip.per_second = 10_000;
        c.limits.rates.auth_per_identity.burst = 10_000;
        c.limits.rates.auth_per_identity.per_second = 10_000;
    })
    .unwrap();
    let small_order_rs: Vec<[u8; 32]> = WEAK_KEYS[..8]
        .iter()
        .map(|h| hex::decode(h).unwrap().try_into().unwrap())
        .collect();
    for weak in WEAK_KEYS {
        let key = quicnprotochat_core::IdentityKey(hex::decode(weak).unwrap().try_into().unwrap());
        // Grind server nonces as an attacker would: a fresh challenge until
        // some small-order R with S = 0 passes plain Ed25519 (ring) over
        // the real transcript (nonce and TLS exporter of this connection).
        let mut refused = false;
        for _ in 0..32 {
            let c = anonymous(&server).await;
            let ch = c.auth_challenge().await.unwrap();
            let transcript = ch.transcript(&key);
            let forged = small_order_rs.iter().find_map(|r| {
                let mut sig = [0u8; 64];
                sig[..32].copy_from_slice(r);
                ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key.as_bytes())
                    .verify(&transcript, &sig)
                    .is_ok()
                    .then_some(sig)
            });
            let Some(sig) = forged else { continue };
            assert_code(
                c.auth_respond(key, sig.to_vec()).await,
                ServerErrorCode::InvalidArgument,
            );
            refused = true;
            break;
        }
        assert!(refused, "no forgery found for {weak} in 32 nonces");
    }
    assert_still_serving(&server).await;
}

/// What a client written from protocol section 10 does after a refusal.
#[derive(Debug, Clone, Copy)]
enum AfterRefusedAuthenticate {
    /// Wait `retryAfterMs`, then call `authenticate` again with the same proof.
    RetrySameProof,
    /// Wait `retryAfterMs`, then start over from `challenge`.
    NewChallenge,
}

fn retry_after(e: &ClientError) -> Option<Duration> {
    match e {
        ClientError::Server {
            code: ServerErrorCode::RateLimited,
            retry_after,
            ..
        } => Some(retry_after.expect("rateLimited carries retryAfterMs")),
        _ => None,
    }
}

/// Logs in following the document literally: waits exactly `retryAfterMs`
/// on every `rateLimited`; returns (challenges, authenticates) made.
async fn literal_login(
    c: &Client,
    id: &Identity,
    policy: AfterRefusedAuthenticate,
    clock: &ManualClock,
) -> Result<(u32, u32), String> {
    let key = id.public_key();
    let (mut challenges, mut authenticates) = (0, 0);
    'challenge: while challenges < 200 {
        challenges += 1;
        let ch = match c.auth_challenge().await {
            Ok(ch) => ch,
            Err(e) => match retry_after(&e) {
                Some(wait) => {
                    clock.advance(wait);
                    continue;
                }
                None => return Err(format!("challenge: {e}")),
            },
        };
        let proof = id.sign(&ch.transcript(&key)).unwrap();
        loop {
            authenticates += 1;
            match c.auth_respond(key, proof.clone()).await {
                Ok(()) => return Ok((challenges, authenticates)),
                Err(e) => match (retry_after(&e), policy) {
                    (Some(wait), AfterRefusedAuthenticate::RetrySameProof) => {
                        clock.advance(wait);
                    }
                    (Some(wait), AfterRefusedAuthenticate::NewChallenge) => {
                        clock.advance(wait);
                        continue 'challenge;
                    }
                    (None, _) => return Err(format!("authenticate: {e}")),
                },
            }
        }
    }
    Err(format!("no session after {challenges} challenges"))
}

#[tokio::test]
async fn a_client_following_the_document_gets_in_from_an_empty_address_bucket() {
    // Default limits (5 per second, burst 20), as the report that found
    // the starvation used; waiting is advancing the server's clock.
    let clock = Arc::new(ManualClock::starting_now());
    let server = TestServer::start_with(|c| c.clock = clock.clone()).unwrap();
    for policy in [
        AfterRefusedAuthenticate::NewChallenge,
        AfterRefusedAuthenticate::RetrySameProof,
    ] {
        // Empty this address's bucket from another connection.
        let drain = anonymous(&server).await;
        let mut drained = false;
        for _ in 0..100 {
            if let Err(e) = drain.auth_challenge().await {
                assert!(retry_after(&e).is_some(), "{e}");
                drained = true;
                break;
            }
        }
        assert!(drained, "the auth_per_ip bucket never emptied");
        let c = anonymous(&server).await;
        let id = Identity::generate().unwrap();
        let (challenges, authenticates) = literal_login(&c, &id, policy, &clock)
            .await
            .unwrap_or_else(|e| panic!("{policy:?}: {e}"));
        // One token buys one attempt: a refill period per login at most.
        assert!(
            challenges <= 3 && authenticates <= 3,
            "{policy:?}: {challenges} challenges, {authenticates} authenticates"
        );
        c.health().await.unwrap();
    }
}

#[tokio::test]
async fn a_rate_limited_authenticate_keeps_its_nonce_and_the_same_proof_then_succeeds() {
    let clock = Arc::new(ManualClock::starting_now());
    let server = TestServer::start_with(|c| {
        c.limits.rates.auth_per_identity.per_second = 2;
        c.limits.rates.auth_per_identity.burst = 1;
        c.clock = clock.clone();
    })
    .unwrap();
    let victim = Identity::generate().unwrap();
    // Someone else's failed attempt empties the identity's bucket.
    let other = anonymous(&server).await;
    let ch = other.auth_challenge().await.unwrap();
    let forged = Identity::generate()
        .unwrap()
        .sign(&ch.transcript(&victim.public_key()))
        .unwrap();
    assert_code(
        other.auth_respond(victim.public_key(), forged).await,
        ServerErrorCode::Unauthenticated,
    );
    // The owner's attempt is refused for the rate, waits, and its same
    // proof gets in: the refusal did not consume the nonce.
    let c = anonymous(&server).await;
    let ch = c.auth_challenge().await.unwrap();
    let proof = victim.sign(&ch.transcript(&victim.public_key())).unwrap();
    let err = c
        .auth_respond(victim.public_key(), proof.clone())
        .await
        .unwrap_err();
    let wait = retry_after(&err).unwrap_or_else(|| panic!("expected rateLimited, got {err}"));
    clock.advance(wait);
    c.auth_respond(victim.public_key(), proof).await.unwrap();
}
