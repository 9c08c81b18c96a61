//! The real `quicnprotochat-server` binary: start-up, health probe, durability
//! under `kill -9`, and production-mode refusals.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quicnprotochat_client::Client;
use quicnprotochat_client::harness::ServerProcess;
use quicnprotochat_core::Identity;

use crate::support::msg_id;

const BIN: &str = env!("CARGO_BIN_EXE_quicnprotochat-server");

fn health(server: &ServerProcess, addr: SocketAddr) -> bool {
    server
        .command()
        .args(["health", "--addr", &addr.to_string(), "--timeout-secs", "3"])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
}

async fn client(server: &ServerProcess, identity: &Identity) -> Client {
    let c = Client::connect(server.client_config().unwrap())
        .await
        .unwrap();
    c.init_auth(identity).await.unwrap();
    c
}

#[tokio::test]
async fn acknowledged_enqueues_survive_kill_9_and_health_probe_works() {
    let mut server = ServerProcess::start(BIN).unwrap();
    let addr = server.addr();
    assert!(
        health(&server, addr),
        "health probe against a running server"
    );

    let (alice, bob) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let a = client(&server, &alice).await;
    a.register("alice").await.unwrap();
    let b = client(&server, &bob).await;
    b.register("bob").await.unwrap();
    for i in 1..=50u64 {
        a.enqueue(&[bob.public_key()], msg_id(i), format!("m{i}").into_bytes())
            .await
            .unwrap();
    }
    drop((a, b));
    // SIGKILL: no shutdown path runs; only what was committed survives.
    server.kill();
    assert!(
        !health(&server, addr),
        "health probe must fail with the server down"
    );

    server.restart().unwrap();
    let b = client(&server, &bob).await;
    let got = b.fetch(0, 256).await.unwrap();
    assert_eq!(got.len(), 50, "every acknowledged enqueue survives kill -9");
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, e)| e.seq == i as u64 + 1 && e.payload == format!("m{}", i + 1).into_bytes())
    );
}

fn refusal(extra: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("QUICNPROTOCHAT_DATA_DIR", dir.path().join("data"))
        .args(["--mode", "production"]);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = cmd.output().unwrap();
    assert!(Instant::now() < deadline);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn production_mode_refuses_to_start_without_secrets() {
    let key = "11".repeat(32);
    let strong = "s".repeat(40);
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "auth_token"),
        (&[("QUICNPROTOCHAT_AUTH_TOKEN", "devtoken")], "auth_token"),
        (
            &[("QUICNPROTOCHAT_AUTH_TOKEN", "short-token")],
            "auth_token",
        ),
        (&[("QUICNPROTOCHAT_AUTH_TOKEN", &strong)], "db_key"),
        (
            &[
                ("QUICNPROTOCHAT_AUTH_TOKEN", &strong),
                ("QUICNPROTOCHAT_DB_KEY", &key),
            ],
            "cert_path",
        ),
    ];
    for (env, setting) in cases {
        let (ok, stderr) = refusal(env);
        assert!(!ok, "production mode must refuse {env:?}");
        let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "one clear error line, got {stderr}");
        assert!(
            lines[0].contains(setting),
            "the error names {setting}: {stderr}"
        );
        for (_, v) in env.iter() {
            if v.len() >= 8 {
                assert!(!stderr.contains(v), "a secret leaked into the error output");
            }
        }
    }
}
