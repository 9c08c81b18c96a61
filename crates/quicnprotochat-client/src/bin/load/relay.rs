//! The raw-quinn peers: a minimal relay (accept, read a length-prefixed
//! frame, write its payload to each target connection) — the delivery server
//! minus authentication, RPC and storage — and a request/response echo
//! server (read a request on a fresh bidirectional stream, answer one byte),
//! the peer of the P2P path.  Same quinn version and TLS stack as the server.
//!
//! Relay wire format (one bidirectional stream per connection):
//! client hello `u32 id`; client frames `u32 len | u16 n | n × u32 target |
//! payload`; relay frames to a target `u32 len | payload`.  Big-endian.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use quicnprotochat_proto::ALPN;
use quicnprotochat_proto::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use quicnprotochat_proto::transport::{self, ServerAuth};
use quinn::{Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::mpsc;

/// Largest relayed frame.
const MAX_FRAME: usize = 1 << 20;
/// Frames queued per target connection.
const TARGET_QUEUE: usize = 4096;

type Routes = Arc<Mutex<HashMap<u32, mpsc::Sender<Arc<Vec<u8>>>>>>;

/// The transport settings of the delivery server (4 MiB windows).
fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.receive_window(VarInt::from_u32(4 * 1024 * 1024));
    t.stream_receive_window(VarInt::from_u32(4 * 1024 * 1024));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(VarInt::from_u32(600_000))));
    t
}

/// A server endpoint on a free loopback port with a fresh self-signed
/// certificate; returns it and the certificate fingerprint.
pub fn server_endpoint() -> anyhow::Result<(Endpoint, [u8; 32])> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())
        .map_err(|e| anyhow!("relay key: {e}"))?;
    let fp = transport::fingerprint(&cert);
    let crypto = transport::server_crypto(vec![cert], key)?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    sc.transport_config(Arc::new(transport_config()));
    let ep = Endpoint::server(sc, SocketAddr::from(([127, 0, 0, 1], 0)))?;
    Ok((ep, fp))
}

/// A client endpoint pinning `fp`.
pub fn client_endpoint(fp: [u8; 32]) -> anyhow::Result<Endpoint> {
    let mut cc = transport::client_config(&ServerAuth::Pinned(fp), ALPN)?;
    cc.transport_config(Arc::new(transport_config()));
    let mut ep = Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    ep.set_default_client_config(cc);
    Ok(ep)
}

/// Runs the relay for at most `max` (the `relay-serve` subcommand): prints
/// `listening addr=… fp=…` on stderr.
pub async fn serve(max: Duration) -> anyhow::Result<()> {
    let (ep, fp) = server_endpoint()?;
    eprintln!(
        "raw relay listening addr={} fp={}",
        ep.local_addr()?,
        hex::encode(fp)
    );
    let routes: Routes = Arc::new(Mutex::new(HashMap::new()));
    let accept = async {
        while let Some(incoming) = ep.accept().await {
            let routes = routes.clone();
            tokio::spawn(async move {
                if let Ok(conn) = incoming.await {
                    let _ = relay_connection(conn, routes).await;
                }
            });
        }
    };
    let _ = tokio::time::timeout(max, accept).await;
    ep.close(VarInt::from_u32(0), b"done");
    Ok(())
}

fn routes_get(routes: &Routes, id: u32) -> Option<mpsc::Sender<Arc<Vec<u8>>>> {
    routes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&id)
        .cloned()
}

async fn relay_connection(conn: quinn::Connection, routes: Routes) -> anyhow::Result<()> {
    // Idle connections (no stream yet) just wait here until closed.
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut hello = [0u8; 4];
    recv.read_exact(&mut hello).await?;
    let id = u32::from_be_bytes(hello);
    let (tx, mut rx) = mpsc::channel::<Arc<Vec<u8>>>(TARGET_QUEUE);
    routes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, tx);
    tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if send.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    let mut buf = Vec::new();
    while let Some(len) = read_len(&mut recv).await? {
        buf.resize(len, 0);
        recv.read_exact(&mut buf).await?;
        let n = usize::from(u16::from_be_bytes([
            *buf.first().ok_or_else(|| anyhow!("short frame"))?,
            *buf.get(1).ok_or_else(|| anyhow!("short frame"))?,
        ]));
        let body = 2 + 4 * n;
        let payload = buf.get(body..).ok_or_else(|| anyhow!("short frame"))?;
        let mut out = Vec::with_capacity(4 + payload.len());
        out.extend_from_slice(&u32::try_from(payload.len())?.to_be_bytes());
        out.extend_from_slice(payload);
        let out = Arc::new(out);
        for t in 0..n {
            let at = 2 + 4 * t;
            let target = buf
                .get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes)
                .ok_or_else(|| anyhow!("short frame"))?;
            if let Some(tx) = routes_get(&routes, target) {
                let _ = tx.send(out.clone()).await;
            }
        }
    }
    Ok(())
}

/// Reads a big-endian `u32` length; `None` at a clean end of stream.
pub async fn read_len(recv: &mut RecvStream) -> anyhow::Result<Option<usize>> {
    let mut b = [0u8; 4];
    match recv.read_exact(&mut b).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = usize::try_from(u32::from_be_bytes(b))?;
    anyhow::ensure!(len <= MAX_FRAME, "frame of {len} bytes");
    Ok(Some(len))
}

/// A relay client: one connection (on its own endpoint), one stream.
#[derive(Debug)]
pub struct RelayClient {
    /// frames to the relay
    pub send: SendStream,
    /// frames from the relay
    pub recv: RecvStream,
    _conn: quinn::Connection,
    _ep: Endpoint,
}

impl RelayClient {
    /// Connects to the relay at `addr` as `id`.
    pub async fn connect(addr: SocketAddr, fp: [u8; 32], id: u32) -> anyhow::Result<Self> {
        let ep = client_endpoint(fp)?;
        let conn = ep
            .connect(addr, "localhost")?
            .await
            .context("relay connect")?;
        let (mut send, recv) = conn.open_bi().await?;
        send.write_all(&id.to_be_bytes()).await?;
        Ok(Self {
            send,
            recv,
            _conn: conn,
            _ep: ep,
        })
    }

    /// Sends `payload` to `targets`.
    pub async fn send(&mut self, targets: &[u32], payload: &[u8]) -> anyhow::Result<()> {
        let mut f = Vec::with_capacity(6 + 4 * targets.len() + payload.len());
        let len = 2 + 4 * targets.len() + payload.len();
        f.extend_from_slice(&u32::try_from(len)?.to_be_bytes());
        f.extend_from_slice(&u16::try_from(targets.len())?.to_be_bytes());
        for t in targets {
            f.extend_from_slice(&t.to_be_bytes());
        }
        f.extend_from_slice(payload);
        self.send.write_all(&f).await?;
        Ok(())
    }
}

/// Receives the next relayed payload into `buf`; `false` at the end.
pub async fn recv_frame(recv: &mut RecvStream, buf: &mut Vec<u8>) -> anyhow::Result<bool> {
    match read_len(recv).await? {
        None => Ok(false),
        Some(len) => {
            buf.resize(len, 0);
            recv.read_exact(buf).await?;
            Ok(true)
        }
    }
}

/// The request/response echo server of the P2P comparison, running until
/// the endpoint closes.  Each request: `u32 len | len bytes` on a fresh
/// bidirectional stream, finished; the answer is one byte `1`.
pub async fn echo_serve(ep: Endpoint) {
    while let Some(incoming) = ep.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    if recv.read_to_end(MAX_FRAME).await.is_ok() {
                        let _ = send.write_all(&[1]).await;
                        let _ = send.finish();
                    }
                });
            }
        });
    }
}

/// One request/response on a fresh stream of `conn` (the P2P peer).
pub async fn echo_request(conn: &quinn::Connection, payload: &[u8]) -> anyhow::Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&u32::try_from(payload.len())?.to_be_bytes())
        .await?;
    send.write_all(payload).await?;
    send.finish()?;
    let mut ack = [0u8; 1];
    recv.read_exact(&mut ack).await?;
    anyhow::ensure!(ack[0] == 1, "refused");
    Ok(())
}
