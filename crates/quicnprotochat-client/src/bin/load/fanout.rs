//! `fanout`: one sender enqueues each message to the G - 1 other members of
//! a group (one multi-recipient enqueue), every member receives it on its
//! subscription.  Figures per G: delivered recipient-messages/s, latency
//! from send to each receipt, and server CPU µs per recipient (read from
//! /proc/<pid>/stat of the pinned server process).  Peer: the raw quinn
//! relay writing each frame to the G - 1 target connections.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::common::{self, Report, histogram, micros, summary};
use crate::delivery::server_client;
use crate::relay::{self, RelayClient};

/// Bound on the wait for receivers to drain.
const DRAIN: Duration = Duration::from_secs(30);

/// Options of `fanout`.
#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    /// Group sizes (members, sender included).
    #[arg(long, value_delimiter = ',', default_values_t = vec![2usize, 10, 50, 200])]
    pub groups: Vec<usize>,
    /// Seconds of sending per group size.
    #[arg(long, default_value_t = 3)]
    pub fanout_secs: u64,
    /// Upper bound on messages per group size.
    #[arg(long, default_value_t = 20_000)]
    pub fanout_max_messages: u64,
    /// Enqueues in flight (server) / frames per write (none: relay streams).
    #[arg(long, default_value_t = 4)]
    pub fanout_depth: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 256)]
    pub fanout_size: usize,
}

#[derive(Debug)]
struct Side {
    messages: u64,
    deliveries: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
    cpu_us: u64,
}

impl Side {
    fn cpu_per_recipient(&self) -> f64 {
        self.cpu_us as f64 / self.deliveries.max(1) as f64
    }

    fn json(&self) -> Value {
        json!({
            "messages": self.messages,
            "deliveries": self.deliveries,
            "deliveries_per_sec": self.deliveries as f64 / self.elapsed.as_secs_f64().max(1e-9),
            "latency": summary(&self.latency),
            "server_cpu_us_per_recipient": self.cpu_per_recipient(),
        })
    }
}

fn stamped(size: usize, base: Instant) -> Vec<u8> {
    let mut p = vec![0x5a; size.max(8)];
    p[..8].copy_from_slice(&micros(base.elapsed()).to_le_bytes());
    p
}

fn record(h: &mut Histogram<u64>, base: Instant, p: &[u8]) -> anyhow::Result<()> {
    if let Some(s) = p
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
    {
        h.record(micros(base.elapsed()).saturating_sub(s))?;
    }
    Ok(())
}

async fn drain(received: &AtomicU64, expected: u64) {
    let until = Instant::now() + DRAIN;
    while received.load(Ordering::Relaxed) < expected && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn gather(
    tasks: Vec<JoinHandle<anyhow::Result<Histogram<u64>>>>,
) -> anyhow::Result<Histogram<u64>> {
    let mut h = histogram()?;
    for t in tasks {
        h.add(t.await??)?;
    }
    Ok(h)
}

async fn server_side(
    bin: &Path,
    core: Option<usize>,
    a: &FanoutArgs,
    g: usize,
) -> anyhow::Result<Side> {
    let server = common::start_server(bin, core, None)?;
    let (sender, _) = server_client(&server, "fanout-sender").await?;
    let mut members = Vec::new();
    for i in 1..g {
        members.push(server_client(&server, &format!("member{i}")).await?);
    }
    let recipients: Arc<Vec<_>> = Arc::new(members.iter().map(|(_, id)| id.public_key()).collect());
    let base = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for (client, _) in &members {
        let client = client.clone();
        let received = received.clone();
        let mut stop = stop_rx.clone();
        let max = a.fanout_max_messages;
        tasks.push(tokio::spawn(async move {
            let mut h = histogram()?;
            let mut sub = client.subscribe(1).await?;
            let mut n = 0u64;
            while n < max {
                let e = tokio::select! {
                    e = sub.next() => e,
                    _ = stop.changed() => None,
                };
                let Some(e) = e else { break };
                record(&mut h, base, &e.payload)?;
                received.fetch_add(1, Ordering::Relaxed);
                n += 1;
                if n.is_multiple_of(128) {
                    client.ack(e.seq).await?;
                }
            }
            anyhow::Ok(h)
        }));
    }
    let sent = Arc::new(AtomicU64::new(0));
    let cpu0 = server.cpu_us()?;
    let start = Instant::now();
    let until = start + Duration::from_secs(a.fanout_secs);
    let lanes = a.fanout_depth.max(1);
    let per_lane = a.fanout_max_messages / lanes as u64;
    let mut senders = Vec::new();
    for _ in 0..lanes {
        let client = sender.clone();
        let recipients = recipients.clone();
        let sent = sent.clone();
        let size = a.fanout_size;
        senders.push(tokio::spawn(async move {
            let mut k = 0u64;
            while k < per_lane && Instant::now() < until {
                let id = quicnprotochat_core::new_message_id(
                    &quicnprotochat_core::clock::SystemClock::new(),
                )?;
                client.enqueue(&recipients, id, stamped(size, base)).await?;
                sent.fetch_add(1, Ordering::Relaxed);
                k += 1;
            }
            anyhow::Ok(())
        }));
    }
    for t in senders {
        t.await??;
    }
    let messages = sent.load(Ordering::Relaxed);
    drain(&received, messages * (g as u64 - 1)).await;
    let elapsed = start.elapsed();
    let cpu_us = server.cpu_us()?.saturating_sub(cpu0);
    let deliveries = received.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let latency = gather(tasks).await?;
    Ok(Side {
        messages,
        deliveries,
        elapsed,
        latency,
        cpu_us,
    })
}

async fn relay_side(core: Option<usize>, a: &FanoutArgs, g: usize) -> anyhow::Result<Side> {
    let relay = common::start_relay(core, a.fanout_secs + 120)?;
    let mut sender = RelayClient::connect(relay.addr, relay.fingerprint, 0).await?;
    let mut members = Vec::new();
    for i in 1..g {
        members.push(RelayClient::connect(relay.addr, relay.fingerprint, u32::try_from(i)?).await?);
    }
    let targets: Vec<u32> = (1..u32::try_from(g)?).collect();
    let base = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for m in members {
        let received = received.clone();
        let mut stop = stop_rx.clone();
        let max = a.fanout_max_messages;
        tasks.push(tokio::spawn(async move {
            let mut m = m;
            let mut h = histogram()?;
            let mut buf = Vec::new();
            let mut n = 0u64;
            while n < max {
                let more = tokio::select! {
                    r = relay::recv_frame(&mut m.recv, &mut buf) => r?,
                    _ = stop.changed() => false,
                };
                if !more {
                    break;
                }
                record(&mut h, base, &buf)?;
                received.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            anyhow::Ok(h)
        }));
    }
    let cpu0 = relay.cpu_us()?;
    let start = Instant::now();
    let until = start + Duration::from_secs(a.fanout_secs);
    let mut messages = 0u64;
    while messages < a.fanout_max_messages && Instant::now() < until {
        sender.send(&targets, &stamped(a.fanout_size, base)).await?;
        messages += 1;
    }
    drain(&received, messages * (g as u64 - 1)).await;
    let elapsed = start.elapsed();
    let cpu_us = relay.cpu_us()?.saturating_sub(cpu0);
    let deliveries = received.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let latency = gather(tasks).await?;
    drop(sender);
    Ok(Side {
        messages,
        deliveries,
        elapsed,
        latency,
        cpu_us,
    })
}

/// `fanout`.
pub async fn run(bin: &Path, core: Option<usize>, a: &FanoutArgs) -> anyhow::Result<Report> {
    let mut ours = serde_json::Map::new();
    let mut peer = serde_json::Map::new();
    let mut per_recipient = Vec::new();
    for &g in &a.groups {
        anyhow::ensure!(g >= 2, "a group has at least 2 members");
        let s = server_side(bin, core, a, g).await?;
        let r = relay_side(core, a, g).await?;
        per_recipient.push((g, s.cpu_per_recipient(), r.cpu_per_recipient()));
        ours.insert(format!("G={g}"), s.json());
        peer.insert(format!("G={g}"), r.json());
    }
    let at = |g: usize| per_recipient.iter().find(|p| p.0 == g).map(|p| p.1);
    let ratio = match (at(10), a.groups.iter().max().and_then(|&m| at(m))) {
        (Some(small), Some(large)) if small > 0.0 => Some(large / small),
        _ => None,
    };
    Ok(Report {
        scenario: "fanout".into(),
        params: json!({
            "groups": a.groups, "secs": a.fanout_secs, "max_messages": a.fanout_max_messages,
            "depth": a.fanout_depth, "payload_bytes": a.fanout_size,
        }),
        figures: Value::Object(ours),
        peer: "raw quinn relay writing to G - 1 connections".into(),
        peer_figures: Value::Object(peer),
        ratio_of: "server CPU per recipient, largest G / G=10".into(),
        ratio,
        target: "<= 1.2".into(),
        pass: ratio.map(|r| r <= 1.2),
        cpu_us_per_op: json!(
            per_recipient
                .iter()
                .map(|(g, s, r)| json!({"G": g, "server": s, "peer": r}))
                .collect::<Vec<_>>()
        ),
    })
}
