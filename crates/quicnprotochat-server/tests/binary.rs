//! The real `quicnprotochat-server` binary: start-up, health probe, durability
//! under `kill -9`, and production-mode refusals.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quicnprotochat_client::{Client, ClientConfig, ServerAuth};
use quicnprotochat_core::Identity;
use quicnprotochat_proto::rustls::pki_types::CertificateDer;
use quicnprotochat_proto::rustls::pki_types::pem::PemObject;
use quicnprotochat_proto::transport;

use crate::support::msg_id;

const BIN: &str = env!("CARGO_BIN_EXE_quicnprotochat-server");
const TOKEN: &str = "binary-test-token-0123456789abcdef012345";

/// Kills the child on drop so a failing test leaves no server behind.
struct Running {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base_command(data: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("QUICNPROTOCHAT_DATA_DIR", data)
        .env("QUICNPROTOCHAT_AUTH_TOKEN", TOKEN)
        .env("RUST_LOG", "info");
    cmd
}

fn start(data: &Path, listen: &str) -> Running {
    let mut child = base_command(data)
        .args(["serve", "--listen", listen])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("addr=").nth(1) {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server logged its address");
    Running {
        child,
        addr: addr.parse().unwrap(),
    }
}

fn fingerprint(data: &Path) -> [u8; 32] {
    let cert = CertificateDer::from_pem_file(data.join("dev-cert.pem")).unwrap();
    transport::fingerprint(&cert)
}

async fn client(addr: SocketAddr, data: &Path, identity: &Identity) -> Client {
    quicnprotochat_client::harness::install_crypto_provider();
    let c = Client::connect(ClientConfig::new(
        addr,
        ServerAuth::Pinned(fingerprint(data)),
        TOKEN,
    ))
    .await
    .unwrap();
    c.init_auth(identity).await.unwrap();
    c
}

fn health(data: &Path, addr: SocketAddr) -> bool {
    base_command(data)
        .args(["health", "--addr", &addr.to_string(), "--timeout-secs", "3"])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[tokio::test]
async fn acknowledged_enqueues_survive_kill_9_and_health_probe_works() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data, "127.0.0.1:0");
    let addr = server.addr;
    assert!(health(&data, addr), "health probe against a running server");

    let (alice, bob) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let a = client(addr, &data, &alice).await;
    a.register("alice").await.unwrap();
    let b = client(addr, &data, &bob).await;
    b.register("bob").await.unwrap();
    for i in 1..=50u64 {
        a.enqueue(&[bob.public_key()], msg_id(i), format!("m{i}").into_bytes())
            .await
            .unwrap();
    }
    drop((a, b));
    // SIGKILL: no shutdown path runs; only what was committed survives.
    drop(server);
    assert!(
        !health(&data, addr),
        "health probe must fail with the server down"
    );

    let server = start(&data, &addr.to_string());
    let b = client(server.addr, &data, &bob).await;
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
