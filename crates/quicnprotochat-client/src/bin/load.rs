//! `quicnprotochat-load`: a load generator for the delivery server.
//!
//! Starts a server (in this process, on loopback, with the durable SQLCipher
//! store in a temporary directory and rate limits raised out of the way),
//! then runs `pairs` sender/receiver pairs for a fixed duration: each sender
//! keeps `depth` enqueues of `size`-byte payloads in flight; each receiver
//! takes messages from a push subscription (or by polling `fetch`) and
//! acknowledges them in batches.  Prints one JSON line with the figures.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use quicnprotochat_client::Client;
use quicnprotochat_client::harness::TestServer;
use quicnprotochat_core::IdentityKey;
use quicnprotochat_server::config::Rate;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Receive {
    /// server push (`subscribe`)
    Push,
    /// polling `fetch`
    Fetch,
}

/// Load generator for the delivery server.
#[derive(Debug, Parser)]
struct Args {
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 10)]
    pairs: usize,
    /// Payload size in bytes (an MLS application message of ~200 characters).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Enqueues in flight per sender.
    #[arg(long, default_value_t = 16)]
    depth: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Upper bound on messages per sender.
    #[arg(long, default_value_t = 1_000_000)]
    max_messages: u64,
    /// How receivers take messages.
    #[arg(long, value_enum, default_value_t = Receive::Push)]
    receive: Receive,
    /// Acknowledge after this many messages.
    #[arg(long, default_value_t = 128)]
    ack_every: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let unlimited = Rate {
        per_second: 1_000_000,
        burst: 1_000_000,
    };
    let server = TestServer::start_with(|c| {
        c.limits.rates.enqueue_per_identity = unlimited;
        c.limits.rates.enqueue_per_ip = unlimited;
        c.limits.rates.auth_per_ip = unlimited;
        c.limits.queue_depth = 10_000_000;
        c.limits.max_connections_per_ip = 10_000;
    })?;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for i in 0..args.pairs {
        senders.push(server.client(&format!("sender{i}")).await?);
        receivers.push(server.client(&format!("receiver{i}")).await?);
    }
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let payload = vec![0x5a; args.size];

    let mut recv_tasks = Vec::new();
    for r in &receivers {
        let client = r.client.clone();
        let received = received.clone();
        let mode = args.receive;
        let ack_every = args.ack_every;
        recv_tasks.push(tokio::spawn(async move {
            receive(client, mode, ack_every, received).await
        }));
    }

    let started = Instant::now();
    let mut send_tasks = Vec::new();
    for (i, s) in senders.iter().enumerate() {
        let to = receivers[i].identity.public_key();
        for lane in 0..args.depth {
            let client = s.client.clone();
            let sent = sent.clone();
            let payload = payload.clone();
            let per_lane = args.max_messages / args.depth as u64;
            send_tasks.push(tokio::spawn(async move {
                send_lane(client, to, lane as u64, per_lane, payload, deadline, sent).await
            }));
        }
    }
    let mut latency = Histogram::<u64>::new(3)?;
    for t in send_tasks {
        latency.add(t.await??)?;
    }
    let send_elapsed = started.elapsed();
    let total_sent = sent.load(Ordering::Relaxed);
    // Let receivers drain what was sent (bounded).
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::Relaxed) < total_sent && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_elapsed = started.elapsed();
    let total_received = received.load(Ordering::Relaxed);
    for t in recv_tasks {
        t.abort();
    }
    let q = |p: f64| latency.value_at_quantile(p) as f64 / 1000.0;
    let report = serde_json::json!({
        "scenario": "enqueue-deliver",
        "receive": format!("{:?}", args.receive).to_lowercase(),
        "pairs": args.pairs,
        "payload_bytes": args.size,
        "depth": args.depth,
        "sent": total_sent,
        "received": total_received,
        "enqueue_per_sec": total_sent as f64 / send_elapsed.as_secs_f64(),
        "delivered_per_sec": total_received as f64 / all_elapsed.as_secs_f64(),
        "enqueue_latency_ms": {
            "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999),
            "max": latency.max() as f64 / 1000.0, "count": latency.len(),
        },
    });
    println!("{report}");
    drop(senders);
    drop(receivers);
    drop(server);
    anyhow::ensure!(
        total_received == total_sent,
        "lost messages: sent {total_sent}, received {total_received}"
    );
    Ok(())
}

async fn send_lane(
    client: Client,
    to: IdentityKey,
    lane: u64,
    max: u64,
    payload: Vec<u8>,
    deadline: Instant,
    sent: Arc<AtomicU64>,
) -> anyhow::Result<Histogram<u64>> {
    let mut h = Histogram::<u64>::new(3)?;
    let mut n = 0u64;
    while n < max && Instant::now() < deadline {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&lane.to_le_bytes());
        id[8..].copy_from_slice(&n.to_le_bytes());
        let t0 = Instant::now();
        client
            .enqueue(&[to], id, payload.clone())
            .await
            .context("enqueue")?;
        h.record(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX))?;
        sent.fetch_add(1, Ordering::Relaxed);
        n += 1;
    }
    Ok(h)
}

async fn receive(
    client: Client,
    mode: Receive,
    ack_every: u64,
    received: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut unacked = 0u64;
    match mode {
        Receive::Push => {
            let mut sub = client.subscribe(1).await?;
            while let Some(e) = sub.next().await {
                received.fetch_add(1, Ordering::Relaxed);
                unacked += 1;
                if unacked >= ack_every {
                    client.ack(e.seq).await?;
                    unacked = 0;
                }
            }
        }
        Receive::Fetch => {
            let mut next = 1;
            loop {
                let batch = client.fetch(next, 256).await?;
                match batch.last() {
                    Some(last) => {
                        next = last.seq + 1;
                        received.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        client.ack(last.seq).await?;
                    }
                    None => tokio::time::sleep(Duration::from_millis(2)).await,
                }
            }
        }
    }
    Ok(())
}
