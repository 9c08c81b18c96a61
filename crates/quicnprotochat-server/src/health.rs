//! The `health` subcommand's probe: the one client-side part of the server
//! crate.  It connects to a running server and calls `Service.health` (the
//! RPC itself is in the adapter, `rpc.rs`), for container health checks
//! (distroless images have no shell and a QUIC server has no TCP port to
//! probe).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use quicnprotochat_proto::ALPN;
use quicnprotochat_proto::transport::{self, ServerAuth};

/// What the server reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// ready to serve
    pub ok: bool,
    /// server software version
    pub server_version: String,
    /// server wire version
    pub wire_version: u16,
    /// the store answered
    pub store_reachable: bool,
}

/// Probe failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// no answer in time
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// QUIC/TLS failed
    #[error("connection failed: {0}")]
    Connect(String),
    /// the RPC failed
    #[error("health call failed: {0}")]
    Rpc(String),
}

/// Calls `Service.health` at `addr`, pinning the server certificate.  Must run
/// inside a `LocalSet`.
pub async fn probe(
    addr: SocketAddr,
    fingerprint: [u8; 32],
    timeout: Duration,
) -> Result<HealthReport, ProbeError> {
    tokio::time::timeout(timeout, probe_inner(addr, fingerprint))
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
}

async fn probe_inner(addr: SocketAddr, fingerprint: [u8; 32]) -> Result<HealthReport, ProbeError> {
    let bind: SocketAddr = if addr.is_ipv6() {
        (Ipv6Addr::LOCALHOST, 0).into()
    } else {
        (Ipv4Addr::LOCALHOST, 0).into()
    };
    let mut endpoint =
        quinn::Endpoint::client(bind).map_err(|e| ProbeError::Connect(e.to_string()))?;
    let cfg = transport::client_config(&ServerAuth::Pinned(fingerprint), ALPN)
        .map_err(|e| ProbeError::Connect(e.to_string()))?;
    endpoint.set_default_client_config(cfg);
    let conn = endpoint
        .connect(addr, "localhost")
        .map_err(|e| ProbeError::Connect(e.to_string()))?
        .await
        .map_err(|e| ProbeError::Connect(e.to_string()))?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| ProbeError::Connect(e.to_string()))?;
    let result = crate::rpc::call_health(send, recv)
        .await
        .map_err(|e| ProbeError::Rpc(e.to_string()));
    conn.close(0u32.into(), b"bye");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    result
}
