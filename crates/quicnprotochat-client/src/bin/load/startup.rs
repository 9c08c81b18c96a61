//! `coldstart` (exec to the first completed handshake: empty store, then a
//! store holding queued messages; peer: the raw quinn relay binding and
//! answering its first handshake) and `idle-memory` (server RSS per idle
//! authenticated connection against a raw quinn server holding the same
//! number of idle connections).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use quicnprotochat_client::Client;
use quicnprotochat_core::Identity;
use serde_json::json;

use crate::common::{self, Proc, Report};
use crate::delivery::server_client;
use crate::relay;

/// Options of `coldstart`.
#[derive(Debug, Clone, Args)]
pub struct ColdArgs {
    /// Queued messages in the second measurement.
    #[arg(long, default_value_t = 100_000)]
    pub queued: u64,
    /// Recipients the queued messages are spread over (one enqueue carries
    /// a message to all of them).
    #[arg(long, default_value_t = 10)]
    pub queued_recipients: u64,
    /// Starts measured per case (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub starts: usize,
}

/// Options of `idle-memory`.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Idle connections.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Connections opened concurrently.
    #[arg(long, default_value_t = 16)]
    pub idle_concurrency: usize,
}

/// Exec to the first completed handshake with `p`.
async fn first_handshake(p: &Proc) -> anyhow::Result<Duration> {
    let ep = relay::client_endpoint(p.fingerprint)?;
    let conn = tokio::time::timeout(Duration::from_secs(10), ep.connect(p.addr, "localhost")?)
        .await
        .context("handshake timed out")??;
    let t = p.startup + p.since_listening();
    conn.close(0u32.into(), b"done");
    ep.close(0u32.into(), b"done");
    Ok(t)
}

fn median_ms(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v.get(v.len() / 2).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

async fn server_starts(
    bin: &Path,
    core: Option<usize>,
    data: &Path,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        let p = common::start_server(bin, core, Some(data))?;
        out.push(first_handshake(&p).await?);
    }
    Ok(out)
}

async fn fill(p: &Proc, a: &ColdArgs) -> anyhow::Result<u64> {
    let (sender, _) = server_client(p, "cold-sender").await?;
    let mut to = Vec::new();
    for i in 0..a.queued_recipients.max(1) {
        to.push(
            server_client(p, &format!("cold-r{i}"))
                .await?
                .1
                .public_key(),
        );
    }
    let to = Arc::new(to);
    let enqueues = a.queued / a.queued_recipients.max(1);
    let next = Arc::new(AtomicU64::new(0));
    let mut lanes = Vec::new();
    for _ in 0..16 {
        let (c, to, next) = (sender.clone(), to.clone(), next.clone());
        lanes.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= enqueues {
                    break;
                }
                let id = quicnprotochat_core::new_message_id(
                    &quicnprotochat_core::clock::SystemClock::new(),
                )?;
                c.enqueue(&to, id, vec![0x5a; 256]).await?;
            }
            anyhow::Ok(())
        }));
    }
    for l in lanes {
        l.await??;
    }
    Ok(enqueues * to.len() as u64)
}

/// `coldstart`.
pub async fn coldstart(bin: &Path, core: Option<usize>, a: &ColdArgs) -> anyhow::Result<Report> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    // The first start creates the certificate, the database key and the
    // schema; later starts open them.
    let first = {
        let p = common::start_server(bin, core, Some(&data))?;
        first_handshake(&p).await?
    };
    let empty = server_starts(bin, core, &data, a.starts).await?;
    let queued = {
        let p = common::start_server(bin, core, Some(&data))?;
        fill(&p, a).await?
    };
    let full = server_starts(bin, core, &data, a.starts).await?;
    let mut peer = Vec::new();
    for _ in 0..a.starts.max(1) {
        let p = common::start_relay(core, 30)?;
        peer.push(first_handshake(&p).await?);
    }
    let (e, f, r) = (
        median_ms(empty.clone()),
        median_ms(full.clone()),
        median_ms(peer),
    );
    let ms = |v: &[Duration]| {
        v.iter()
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect::<Vec<_>>()
    };
    Ok(Report {
        scenario: "coldstart".into(),
        params: json!({"queued": queued, "starts": a.starts}),
        figures: json!({
            "first_start_ever_ms": first.as_secs_f64() * 1000.0,
            "empty_store_median_ms": e, "empty_store_ms": ms(&empty),
            "queued_store_median_ms": f, "queued_store_ms": ms(&full),
        }),
        peer: "raw quinn bind + first handshake (relay process)".into(),
        peer_figures: json!({"median_ms": r}),
        ratio_of: "empty-store start / raw quinn start".into(),
        ratio: Some(e / r.max(1e-9)),
        target: "empty < 100 ms, queued < 300 ms".into(),
        pass: Some(e < 100.0 && f < 300.0),
        cpu_us_per_op: json!(null),
    })
}

/// `idle-memory`.
pub async fn idle_memory(bin: &Path, core: Option<usize>, a: &IdleArgs) -> anyhow::Result<Report> {
    let k = a.connections.max(1);
    // Server: authenticated connections, each with its own client.
    let server = common::start_server(bin, core, None)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = server.rss_kib()?;
    let config = server.client_config();
    let mut clients: Vec<Client> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while clients.len() < k && Instant::now() < deadline {
        let batch = (k - clients.len()).min(a.idle_concurrency.max(1));
        let mut tasks = Vec::new();
        for _ in 0..batch {
            let config = config.clone();
            tasks.push(tokio::spawn(async move {
                let identity = Identity::generate()?;
                let c = Client::connect(config).await?;
                c.init_auth(&identity).await?;
                anyhow::Ok(c)
            }));
        }
        for t in tasks {
            clients.push(t.await??);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_k = server.rss_kib()?;
    let n = clients.len();
    drop(clients);
    drop(server);
    // Peer: a raw quinn server (the relay) holding idle connections.
    let relay = common::start_relay(core, 300)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peer0 = relay.rss_kib()?;
    let ep = relay::client_endpoint(relay.fingerprint)?;
    let mut conns = Vec::new();
    for _ in 0..k {
        conns.push(ep.connect(relay.addr, "localhost")?.await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let peer_k = relay.rss_kib()?;
    drop(conns);
    let ours = (rss_k.saturating_sub(rss0)) as f64 / n.max(1) as f64;
    let theirs = (peer_k.saturating_sub(peer0)) as f64 / k as f64;
    let ratio = ours / theirs.max(1e-9);
    Ok(Report {
        scenario: "idle-memory".into(),
        params: json!({"connections": k}),
        figures: json!({"connections": n, "rss0_kib": rss0, "rss_k_kib": rss_k, "kib_per_connection": ours}),
        peer: "raw quinn server holding idle connections".into(),
        peer_figures: json!({"rss0_kib": peer0, "rss_k_kib": peer_k, "kib_per_connection": theirs}),
        ratio_of: "KiB per idle connection".into(),
        ratio: Some(ratio),
        target: "<= 2".into(),
        pass: Some(ratio <= 2.0 && n == k),
        cpu_us_per_op: json!(null),
    })
}
