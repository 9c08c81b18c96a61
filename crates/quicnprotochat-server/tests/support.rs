//! Helpers shared by the server's integration tests.

use std::time::Duration;

use quicnprotochat_client::harness::{TEST_TOKEN, TestClient, TestServer};
use quicnprotochat_client::{Client, ClientError, ServerErrorCode};
use quicnprotochat_core::Identity;
use quicnprotochat_proto::capnp_rpc::RpcSystem;
use quicnprotochat_proto::rpc::{Side, default_frame_limits, rpc_system};
use quicnprotochat_proto::schema::{service, session};
use quicnprotochat_proto::transport::{self, ServerAuth};
use quicnprotochat_proto::{ALPN, WIRE_VERSION, auth};

/// Asserts `r` failed with the server error `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(r: Result<T, ClientError>, code: ServerErrorCode) {
    match r {
        Err(ClientError::Server { code: got, .. }) if got == code => {}
        other => panic!("expected server error {code:?}, got {other:?}"),
    }
}

/// Counts panics on server and store threads of this test process.
static SERVER_PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn watch_server_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current()
                .name()
                .unwrap_or_default()
                .to_string();
            if name.starts_with("quicnprotochat-server") || name.starts_with("store-") {
                SERVER_PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// The server still serves a fresh client end to end, and no server thread
/// of this process has panicked.
pub async fn assert_still_serving(server: &TestServer) {
    watch_server_panics();
    let c = server.connect().await.expect("connect after attack");
    let h = tokio::time::timeout(Duration::from_secs(5), c.health())
        .await
        .expect("health in time")
        .unwrap();
    assert!(h.ok && h.store_reachable);
    let id = Identity::generate().unwrap();
    c.init_auth(&id).await.expect("authenticate after attack");
    assert_eq!(
        SERVER_PANICS.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a server thread panicked"
    );
}

/// A raw QUIC connection to the server (no RPC).
pub async fn raw_connection(server: &TestServer) -> (quinn::Endpoint, quinn::Connection) {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(
        transport::client_config(&ServerAuth::Pinned(server.fingerprint()), ALPN).unwrap(),
    );
    let conn = ep
        .connect(server.addr(), "localhost")
        .unwrap()
        .await
        .unwrap();
    (ep, conn)
}

/// A raw Cap'n Proto session (inside a `LocalSet`), for requests the client
/// library cannot express (wrong-length keys and the like).
pub struct RawSession {
    pub session: session::Client,
    pub _conn: quinn::Connection,
    pub _ep: quinn::Endpoint,
}

pub async fn raw_session(server: &TestServer, identity: &Identity) -> RawSession {
    let (ep, conn) = raw_connection(server).await;
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut rpc: RpcSystem<Side> =
        rpc_system(recv, send, Side::Client, None, default_frame_limits());
    let svc: service::Client = rpc.bootstrap(Side::Server);
    tokio::task::spawn_local(rpc);
    let mut req = svc.challenge_request();
    req.get().set_wire_version(WIRE_VERSION);
    let resp = req.send().promise.await.unwrap();
    let nonce: [u8; 32] = resp.get().unwrap().get_nonce().unwrap().try_into().unwrap();
    let mut exporter = [0; 32];
    conn.export_keying_material(&mut exporter, auth::EXPORTER_LABEL, b"")
        .unwrap();
    let key = identity.public_key();
    let sig = identity
        .sign(&auth::transcript(&nonce, &exporter, key.as_bytes()))
        .unwrap();
    let mut req = svc.authenticate_request();
    {
        let mut a = req.get().init_request();
        a.set_wire_version(WIRE_VERSION);
        a.set_access_token(TEST_TOKEN.as_bytes());
        a.set_identity_key(key.as_bytes());
        a.set_signature(&sig);
    }
    let resp = req.send().promise.await.unwrap();
    let r = resp.get().unwrap();
    assert!(!r.has_error());
    RawSession {
        session: r.get_session().unwrap(),
        _conn: conn,
        _ep: ep,
    }
}

/// Three registered clients.
pub async fn trio(server: &TestServer) -> (TestClient, TestClient, TestClient) {
    (
        server.client("alice").await.unwrap(),
        server.client("bob").await.unwrap(),
        server.client("carol").await.unwrap(),
    )
}

/// A fresh 16-byte message id.
pub fn msg_id(n: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_le_bytes());
    id[8..].copy_from_slice(&std::process::id().to_le_bytes().repeat(2));
    id
}

/// Connects a client that is never authenticated.
pub async fn anonymous(server: &TestServer) -> Client {
    server.connect().await.unwrap()
}

/// The next message pushed on `sub`, within 5 s; fails the test otherwise.
pub async fn pushed(
    sub: &mut quicnprotochat_client::Subscription,
) -> quicnprotochat_client::Envelope {
    tokio::time::timeout(std::time::Duration::from_secs(5), sub.next())
        .await
        .expect("a message pushed within 5 s")
        .expect("the subscription still open")
}
