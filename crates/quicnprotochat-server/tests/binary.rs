//! The real `quicnprotochat-server` binary: start-up, health probe and
//! durability under `kill -9`.

use std::net::SocketAddr;
use std::process::Stdio;

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
