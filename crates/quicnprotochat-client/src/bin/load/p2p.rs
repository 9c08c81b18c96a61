//! `p2p`: direct delivery over iroh (`quicnprotochat_p2p::Node::send`, one
//! acknowledged request on a fresh stream per message) against the same
//! request/response pattern over raw quinn, and beside the server path
//! (enqueue to delivery on the receiver's subscription).  Both P2P ends run
//! in this process; the server runs as a pinned child process.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use quicnprotochat_p2p::{Node, NodeConfig};
use serde_json::{Value, json};

use crate::common::{self, Report, histogram, micros, summary};
use crate::delivery::server_client;
use crate::relay;

/// Options of `p2p`.
#[derive(Debug, Clone, Args)]
pub struct P2pArgs {
    /// Seconds of each closed-loop latency run (one message in flight).
    #[arg(long, default_value_t = 3)]
    pub p2p_latency_secs: u64,
    /// Seconds of each throughput run.
    #[arg(long, default_value_t = 3)]
    pub p2p_throughput_secs: u64,
    /// Messages in flight in the throughput runs.
    #[arg(long, default_value_t = 32)]
    pub p2p_concurrency: usize,
    /// Upper bound on messages per run.
    #[arg(long, default_value_t = 200_000)]
    pub p2p_max_messages: u64,
    /// Payload bytes.
    #[arg(long, default_value_t = 256)]
    pub p2p_size: usize,
}

#[derive(Debug)]
struct PathFigures {
    latency: Histogram<u64>,
    per_sec: f64,
    cpu_us_per_msg: f64,
}

impl PathFigures {
    fn json(&self) -> Value {
        json!({
            "latency_1_in_flight": summary(&self.latency),
            "msgs_per_sec": self.per_sec,
            "process_cpu_us_per_msg": self.cpu_us_per_msg,
        })
    }
}

/// Runs `op` closed loop (one in flight) for `secs`, then with `conc` in
/// flight; returns latency, throughput and this process's CPU per message.
async fn measure<F, Fut>(a: &P2pArgs, op: F) -> anyhow::Result<PathFigures>
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let mut latency = histogram()?;
    let until = Instant::now() + Duration::from_secs(a.p2p_latency_secs);
    let mut n = 0u64;
    while n < a.p2p_max_messages && Instant::now() < until {
        let t0 = Instant::now();
        op(n).await?;
        latency.record(micros(t0.elapsed()))?;
        n += 1;
    }
    let done = Arc::new(AtomicU64::new(0));
    let cpu0 = common::cpu_us("self")?;
    let start = Instant::now();
    let until = start + Duration::from_secs(a.p2p_throughput_secs);
    let per_task = a.p2p_max_messages / a.p2p_concurrency.max(1) as u64;
    let mut tasks = Vec::new();
    for lane in 0..a.p2p_concurrency.max(1) {
        let op = op.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            while k < per_task && Instant::now() < until {
                op((1 << 40) + ((lane as u64) << 24) + k).await?;
                done.fetch_add(1, Ordering::Relaxed);
                k += 1;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = common::cpu_us("self")?.saturating_sub(cpu0);
    let total = done.load(Ordering::Relaxed);
    Ok(PathFigures {
        latency,
        per_sec: total as f64 / elapsed.max(1e-9),
        cpu_us_per_msg: cpu as f64 / (total.max(1)) as f64,
    })
}

fn random32() -> anyhow::Result<[u8; 32]> {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    Ok(b)
}

async fn iroh_path(a: &P2pArgs) -> anyhow::Result<PathFigures> {
    let config = NodeConfig {
        peer_rate: (1_000_000, 1_000_000),
        ..NodeConfig::default()
    };
    let (sender, _sender_rx) = Node::bind(random32()?, config.clone()).await?;
    let (receiver, mut rx) = Node::bind(random32()?, config).await?;
    receiver.allow(sender.id());
    let accept = tokio::spawn(async move {
        while let Some(inbound) = rx.recv().await {
            inbound.accept();
        }
    });
    let peer = receiver.addr();
    let payload = Arc::new(vec![0x5a; a.p2p_size]);
    let node = sender.clone();
    let figures = measure(a, move |n| {
        let node = node.clone();
        let peer = peer.clone();
        let payload = payload.clone();
        async move {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&n.to_le_bytes());
            node.send(&peer, id, &payload).await?;
            Ok(())
        }
    })
    .await;
    sender.close().await;
    receiver.close().await;
    accept.abort();
    figures
}

async fn quinn_path(a: &P2pArgs) -> anyhow::Result<PathFigures> {
    let (server, fp) = relay::server_endpoint()?;
    let addr: SocketAddr = server.local_addr()?;
    let serve = tokio::spawn(relay::echo_serve(server.clone()));
    let client = relay::client_endpoint(fp)?;
    let conn = client
        .connect(addr, "localhost")?
        .await
        .context("connect")?;
    let payload = Arc::new(vec![0x5a; a.p2p_size + 16]);
    let c = conn.clone();
    let figures = measure(a, move |_| {
        let c = c.clone();
        let payload = payload.clone();
        async move { relay::echo_request(&c, &payload).await }
    })
    .await;
    conn.close(0u32.into(), b"done");
    server.close(0u32.into(), b"done");
    serve.abort();
    figures
}

/// Closed-loop send-to-receive latency through the server (one in flight).
async fn server_path(bin: &Path, core: Option<usize>, a: &P2pArgs) -> anyhow::Result<Value> {
    let server = common::start_server(bin, core, None)?;
    let (sender, _) = server_client(&server, "p2p-sender").await?;
    let (receiver, rid) = server_client(&server, "p2p-receiver").await?;
    let mut sub = receiver.subscribe(1).await?;
    let to = rid.public_key();
    let mut h = histogram()?;
    let cpu0 = server.cpu_us()?;
    let until = Instant::now() + Duration::from_secs(a.p2p_latency_secs);
    let mut n = 0u64;
    while n < a.p2p_max_messages && Instant::now() < until {
        let id =
            quicnprotochat_core::new_message_id(&quicnprotochat_core::clock::SystemClock::new())?;
        let t0 = Instant::now();
        sender.enqueue(&[to], id, vec![0x5a; a.p2p_size]).await?;
        let e = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .context("delivery timed out")?
            .context("subscription ended")?;
        h.record(micros(t0.elapsed()))?;
        n += 1;
        if n.is_multiple_of(128) {
            receiver.ack(e.seq).await?;
        }
    }
    let cpu = server.cpu_us()?.saturating_sub(cpu0);
    Ok(json!({
        "latency_1_in_flight": summary(&h),
        "server_cpu_us_per_msg": cpu as f64 / n.max(1) as f64,
    }))
}

/// `p2p`.
pub async fn run(bin: &Path, core: Option<usize>, a: &P2pArgs) -> anyhow::Result<Report> {
    let iroh = iroh_path(a).await?;
    let quinn = quinn_path(a).await?;
    let server = server_path(bin, core, a).await?;
    let p50 = |h: &Histogram<u64>| h.value_at_quantile(0.5) as f64;
    let lat_ratio = p50(&iroh.latency) / p50(&quinn.latency).max(1.0);
    let mut figures = iroh.json();
    if let Some(o) = figures.as_object_mut() {
        o.insert("server_path".into(), server);
        o.insert(
            "throughput_ratio_vs_raw_quinn".into(),
            json!(iroh.per_sec / quinn.per_sec.max(1e-9)),
        );
    }
    Ok(Report {
        scenario: "p2p".into(),
        params: json!({
            "payload_bytes": a.p2p_size, "concurrency": a.p2p_concurrency,
            "latency_secs": a.p2p_latency_secs, "throughput_secs": a.p2p_throughput_secs,
            "both_ends_in_this_process": true,
        }),
        figures,
        peer: "raw quinn request/response (fresh bidi stream per message)".into(),
        peer_figures: quinn.json(),
        ratio_of: "latency p50 (1 in flight)".into(),
        ratio: Some(lat_ratio),
        target: "reported beside raw quinn (no target)".into(),
        pass: None,
        cpu_us_per_op: json!({"iroh": iroh.cpu_us_per_msg, "peer": quinn.cpu_us_per_msg}),
    })
}
