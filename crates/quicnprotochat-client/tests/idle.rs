//! Idle sessions (`IdleSession`): many authenticated sessions from one
//! endpoint on the caller's `LocalSet`, as the load generator holds them.

use std::time::Duration;

use quicnprotochat_client::harness::TestServer;
use quicnprotochat_client::{ClientError, IdleSession, ServerErrorCode};
use quicnprotochat_core::Identity;

#[tokio::test]
async fn idle_sessions_share_an_endpoint_are_authenticated_and_outlive_the_login_deadline() {
    let server = TestServer::start_with(|c| {
        c.limits.auth_timeout_secs = 1;
        // 40 logins from one address at once.
        c.limits.rates.auth_per_ip.burst = 100;
    })
    .unwrap();
    let config = server.client_config();
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let ep = IdleSession::endpoint("127.0.0.1:0".parse().unwrap(), &config).unwrap();
            let mut held = Vec::new();
            for _ in 0..40 {
                let id = Identity::generate().unwrap();
                held.push(IdleSession::open(&ep, &config, &id).await.unwrap());
            }
            // A connection from the same endpoint that never logs in.
            let silent = ep
                .connect(config.server_addr, &config.server_name)
                .unwrap()
                .await
                .unwrap();
            let mut bad = config.clone();
            bad.access_token = b"not-the-token".to_vec();
            let refused = IdleSession::open(&ep, &bad, &Identity::generate().unwrap()).await;
            assert!(
                matches!(
                    refused,
                    Err(ClientError::Server {
                        code: ServerErrorCode::Unauthenticated,
                        ..
                    })
                ),
                "{refused:?}"
            );
            // Past the login deadline the server closed the silent one and
            // kept every authenticated session.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            assert!(
                silent.close_reason().is_some(),
                "the silent connection is open"
            );
            assert_eq!(held.iter().filter(|s| s.is_closed()).count(), 0);
            drop(held);
        })
        .await;
    let health = server.connect().await.unwrap().health().await.unwrap();
    assert!(health.ok);
}
