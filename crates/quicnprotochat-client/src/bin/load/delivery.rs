//! `throughput` and `latency`: pairs of senders and receivers through the
//! real server (a child process, durable SQLCipher store) and through the
//! raw quinn relay, in the same run.
//!
//! Every payload carries, in its first 8 bytes, the intended send time in µs
//! since the run's base instant: as fast as possible (throughput) that is
//! the actual send time; paced (latency) it is the scheduled time, so a
//! stalled sender does not hide queueing delay (no coordinated omission).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use quicnprotochat_client::Client;
use quicnprotochat_core::{Identity, IdentityKey};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::common::{self, Proc, Report, histogram, micros, summary};
use crate::relay::{self, RelayClient};

/// Bound on the wait for receivers to drain what was sent.
const DRAIN: Duration = Duration::from_secs(30);

/// Options of the delivery scenarios.
#[derive(Debug, Clone, Args)]
pub struct DeliveryArgs {
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 10)]
    pub pairs: usize,
    /// Payload size in bytes (an MLS application message of ~200 characters).
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Enqueues in flight per sender (server path).
    #[arg(long, default_value_t = 16)]
    pub depth: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Upper bound on messages per sender.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_messages: u64,
    /// Acknowledge after this many messages.
    #[arg(long, default_value_t = 128)]
    pub ack_every: u64,
    /// Minor wire version the clients announce: from 3 on a client gathers
    /// the sends that wait into `enqueueBatch` calls; 2 sends one `enqueue`
    /// per message.
    #[arg(long, default_value_t = quicnprotochat_proto::WIRE_VERSION)]
    pub wire_version: u16,
}

/// What one side (server or relay) measured.
#[derive(Debug)]
pub struct Outcome {
    sent: u64,
    received: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
    /// CPU µs of the server processes (summed over the nodes) or the relay
    cpu_us: u64,
    /// server nodes the clients were spread over
    nodes: usize,
    /// CPU µs of the database server (postmaster and its children), when
    /// the store is PostgreSQL
    db_cpu_us: Option<u64>,
}

impl Outcome {
    /// What a run through one server process measured (a chat-server
    /// peer's, say): `cpu_us` of that process, no database.
    pub fn of_one_process(
        sent: u64,
        received: u64,
        elapsed: Duration,
        latency: Histogram<u64>,
        cpu_us: u64,
    ) -> Self {
        Self {
            sent,
            received,
            elapsed,
            latency,
            cpu_us,
            nodes: 1,
            db_cpu_us: None,
        }
    }

    /// Messages whose enqueue the server acknowledged.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Messages the receivers got.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Delivered messages per second.
    pub fn per_sec(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Server (or relay) CPU µs per delivered message.
    pub fn cpu_per_msg(&self) -> Option<f64> {
        (self.received > 0).then(|| self.cpu_us as f64 / self.received as f64)
    }

    /// Database CPU µs per delivered message (PostgreSQL store only).
    pub fn db_cpu_per_msg(&self) -> Option<f64> {
        let db = self.db_cpu_us?;
        (self.received > 0).then(|| db as f64 / self.received as f64)
    }

    /// Send-to-receive latency (µs).
    pub fn latency(&self) -> &Histogram<u64> {
        &self.latency
    }

    /// Whether every message sent was received.
    pub fn complete(&self) -> bool {
        self.received == self.sent
    }

    /// The figures as JSON.
    pub fn figures(&self) -> Value {
        let mut v = json!({
            "sent": self.sent,
            "received": self.received,
            "seconds": self.elapsed.as_secs_f64(),
            "delivered_per_sec": self.per_sec(),
            "latency": summary(&self.latency),
            "server_cpu_us_per_msg": self.cpu_per_msg(),
        });
        if self.db_cpu_us.is_some()
            && let Some(o) = v.as_object_mut()
        {
            o.insert("nodes".into(), json!(self.nodes));
            o.insert("db_cpu_us_per_msg".into(), json!(self.db_cpu_per_msg()));
        }
        v
    }
}

/// A payload of `size` bytes stamped with `stamp_us`.
fn payload(size: usize, stamp_us: u64) -> Vec<u8> {
    let mut p = vec![0x5a; size.max(8)];
    p[..8].copy_from_slice(&stamp_us.to_le_bytes());
    p
}

fn stamp_of(p: &[u8]) -> Option<u64> {
    p.get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
}

/// Pacing: `None` as fast as possible, else one message per interval per lane.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    interval: Option<Duration>,
}

impl Pace {
    /// As fast as possible (`None`), or open loop at `rate` messages/s in
    /// total: each of the pairs × depth lanes sends once per interval.
    pub fn at(rate: Option<f64>, a: &DeliveryArgs) -> anyhow::Result<Self> {
        let Some(rate) = rate else {
            return Ok(Self { interval: None });
        };
        anyhow::ensure!(rate > 0.0 && rate.is_finite(), "rate must be positive");
        let lanes = (a.pairs * a.depth.max(1)) as f64;
        Ok(Self {
            interval: Some(Duration::from_secs_f64(lanes / rate)),
        })
    }

    /// Seconds between two sends of one lane; 0 when as fast as possible.
    pub fn interval_secs(&self) -> f64 {
        self.interval.map_or(0.0, |i| i.as_secs_f64())
    }

    /// Waits for the `n`-th slot of a lane (offset `offset`) and returns the
    /// stamp: the intended send time in µs since `base`.
    pub async fn slot(&self, base: Instant, start: Instant, offset: Duration, n: u64) -> u64 {
        match self.interval {
            None => micros(base.elapsed()),
            Some(iv) => {
                let at = start + offset + iv.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX));
                tokio::time::sleep_until(at.into()).await;
                micros(at.duration_since(base))
            }
        }
    }

    /// Whether the `n`-th slot is before `deadline`.
    pub fn within(&self, start: Instant, offset: Duration, n: u64, deadline: Instant) -> bool {
        match self.interval {
            None => Instant::now() < deadline,
            Some(iv) => {
                start + offset + iv.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX)) < deadline
            }
        }
    }
}

/// Waits (bounded) until `received` reaches `sent`.
async fn drain(received: &AtomicU64, sent: u64) {
    let until = Instant::now() + DRAIN;
    while received.load(Ordering::Relaxed) < sent && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn join_histograms(
    tasks: Vec<JoinHandle<anyhow::Result<Histogram<u64>>>>,
) -> anyhow::Result<Histogram<u64>> {
    let mut h = histogram()?;
    for t in tasks {
        h.add(t.await??)?;
    }
    Ok(h)
}

/// An authenticated, registered client of the server process.
pub async fn server_client(server: &Proc, name: &str) -> anyhow::Result<(Client, Identity)> {
    server_client_of(server, name, quicnprotochat_proto::WIRE_VERSION).await
}

/// [`server_client`] announcing minor wire version `wire_version`.
pub async fn server_client_of(
    server: &Proc,
    name: &str,
    wire_version: u16,
) -> anyhow::Result<(Client, Identity)> {
    let identity = Identity::generate()?;
    let mut config = server.client_config();
    config.wire_version = wire_version;
    let client = Client::connect(config).await.context("connect")?;
    client.init_auth(&identity).await.context("auth")?;
    client.register(name).await.context("register")?;
    Ok((client, identity))
}

/// The server path: one server process of its own, started and stopped here.
async fn run_server(
    bin: &Path,
    core: Option<usize>,
    a: &DeliveryArgs,
    pace: Pace,
    extra: &[&str],
) -> anyhow::Result<Outcome> {
    let server = common::start_server_with(bin, core, None, extra)?;
    let out = drive(std::slice::from_ref(&server), a, pace, None).await;
    drop(server);
    out
}

/// The single-node server on its default store (durable SQLCipher, the
/// `throughput` path): as fast as possible (`rate` `None`) or open loop at
/// `rate` messages/s in total.
pub async fn sqlcipher(
    bin: &Path,
    core: Option<usize>,
    a: &DeliveryArgs,
    rate: Option<f64>,
) -> anyhow::Result<Outcome> {
    run_server(bin, core, a, Pace::at(rate, a)?, &[]).await
}

/// Distinguishes the usernames of successive runs on one database.
static RUN: AtomicU64 = AtomicU64::new(0);

/// Drives `a.pairs` sender/receiver pairs through the running server
/// `nodes`: sender i on node i mod N, its receiver on node (i + 1) mod N, so
/// with N ≥ 2 every message crosses nodes (with N = 1 both are on the one
/// node).  Server CPU is summed over the nodes; with `db` (the PostgreSQL
/// postmaster's pid), the database's CPU (postmaster and children) too.
pub async fn drive(
    nodes: &[Proc],
    a: &DeliveryArgs,
    pace: Pace,
    db: Option<u32>,
) -> anyhow::Result<Outcome> {
    anyhow::ensure!(!nodes.is_empty(), "no server to drive");
    let n = nodes.len();
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for i in 0..a.pairs {
        senders.push(
            server_client_of(&nodes[i % n], &format!("sender{i}-{run}"), a.wire_version).await?,
        );
        receivers.push(server_client(&nodes[(i + 1) % n], &format!("receiver{i}-{run}")).await?);
    }
    let base = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut recv_tasks = Vec::new();
    for (client, _) in &receivers {
        let client = client.clone();
        let received = received.clone();
        let ack_every = a.ack_every;
        let max = a.max_messages;
        let mut stop = stop_rx.clone();
        recv_tasks.push(tokio::spawn(async move {
            let mut h = histogram()?;
            let mut sub = client.subscribe(1).await?;
            let mut unacked = 0u64;
            let mut n = 0u64;
            while n < max {
                let e = tokio::select! {
                    e = sub.next() => e,
                    _ = stop.changed() => None,
                };
                let Some(e) = e else { break };
                if let Some(s) = stamp_of(&e.payload) {
                    h.record(micros(base.elapsed()).saturating_sub(s))?;
                }
                received.fetch_add(1, Ordering::Relaxed);
                n += 1;
                unacked += 1;
                if unacked >= ack_every {
                    client.ack(e.seq).await?;
                    unacked = 0;
                }
            }
            anyhow::Ok(h)
        }));
    }
    let cpu0 = nodes_cpu_us(nodes)?;
    let db0 = db.map(common::tree_cpu_us).transpose()?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.duration);
    let lanes = a.depth.max(1);
    let mut send_tasks = Vec::new();
    for (i, (client, _)) in senders.iter().enumerate() {
        let to = receivers[i].1.public_key();
        for lane in 0..lanes {
            let client = client.clone();
            let sent = sent.clone();
            let size = a.size;
            let per_lane = a.max_messages / lanes as u64;
            let offset = pace.interval.map_or(Duration::ZERO, |iv| {
                iv.mul_f64((i * lanes + lane) as f64 / (a.pairs * lanes) as f64)
            });
            send_tasks.push(tokio::spawn(async move {
                send_lane(
                    client, to, per_lane, size, pace, base, start, offset, deadline, sent,
                )
                .await
            }));
        }
    }
    for t in send_tasks {
        t.await??;
    }
    let total_sent = sent.load(Ordering::Relaxed);
    drain(&received, total_sent).await;
    let elapsed = start.elapsed();
    let cpu_us = nodes_cpu_us(nodes)?.saturating_sub(cpu0);
    let db_cpu_us = match (db, db0) {
        (Some(pid), Some(d0)) => Some(common::tree_cpu_us(pid)?.saturating_sub(d0)),
        _ => None,
    };
    let total_received = received.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let latency = join_histograms(recv_tasks).await?;
    drop(senders);
    drop(receivers);
    Ok(Outcome {
        sent: total_sent,
        received: total_received,
        elapsed,
        latency,
        cpu_us,
        nodes: n,
        db_cpu_us,
    })
}

/// CPU µs of the server processes, summed.
fn nodes_cpu_us(nodes: &[Proc]) -> anyhow::Result<u64> {
    nodes.iter().map(Proc::cpu_us).sum()
}

#[allow(clippy::too_many_arguments)]
async fn send_lane(
    client: Client,
    to: IdentityKey,
    max: u64,
    size: usize,
    pace: Pace,
    base: Instant,
    start: Instant,
    offset: Duration,
    deadline: Instant,
    sent: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut n = 0u64;
    while n < max && pace.within(start, offset, n, deadline) {
        let stamp = pace.slot(base, start, offset, n).await;
        let id =
            quicnprotochat_core::new_message_id(&quicnprotochat_core::clock::SystemClock::new())?;
        client
            .enqueue(&[to], id, payload(size, stamp))
            .await
            .context("enqueue")?;
        sent.fetch_add(1, Ordering::Relaxed);
        n += 1;
    }
    Ok(())
}

/// The raw relay path.
async fn run_relay(core: Option<usize>, a: &DeliveryArgs, pace: Pace) -> anyhow::Result<Outcome> {
    let relay = common::start_relay(core, a.duration + 120)?;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for i in 0..a.pairs {
        let i = u32::try_from(i)?;
        senders.push(RelayClient::connect(relay.addr, relay.fingerprint, 2 * i).await?);
        receivers.push(RelayClient::connect(relay.addr, relay.fingerprint, 2 * i + 1).await?);
    }
    let base = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut recv_tasks: Vec<JoinHandle<anyhow::Result<Histogram<u64>>>> = Vec::new();
    for r in receivers {
        let received = received.clone();
        let max = a.max_messages;
        let mut stop = stop_rx.clone();
        recv_tasks.push(tokio::spawn(async move {
            let mut r = r;
            let mut h = histogram()?;
            let mut buf = Vec::new();
            let mut n = 0u64;
            while n < max {
                let more = tokio::select! {
                    m = relay::recv_frame(&mut r.recv, &mut buf) => m?,
                    _ = stop.changed() => false,
                };
                if !more {
                    break;
                }
                if let Some(s) = stamp_of(&buf) {
                    h.record(micros(base.elapsed()).saturating_sub(s))?;
                }
                received.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            Ok(h)
        }));
    }
    // Per pair, the relay sender uses one stream: the lane count is 1 and
    // the pace interval covers all of a sender's lanes on the server path.
    let relay_pace = Pace {
        interval: pace
            .interval
            .map(|iv| iv / u32::try_from(a.depth.max(1)).unwrap_or(1)),
    };
    let cpu0 = relay.cpu_us()?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.duration);
    let mut send_tasks = Vec::new();
    for (i, mut s) in senders.into_iter().enumerate() {
        let target = u32::try_from(2 * i + 1)?;
        let sent = sent.clone();
        let size = a.size;
        let max = a.max_messages;
        let offset = relay_pace
            .interval
            .map_or(Duration::ZERO, |iv| iv.mul_f64(i as f64 / a.pairs as f64));
        send_tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while n < max && relay_pace.within(start, offset, n, deadline) {
                let stamp = relay_pace.slot(base, start, offset, n).await;
                s.send(&[target], &payload(size, stamp)).await?;
                sent.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            anyhow::Ok(s)
        }));
    }
    let mut open = Vec::new();
    for t in send_tasks {
        open.push(t.await??);
    }
    let total_sent = sent.load(Ordering::Relaxed);
    drain(&received, total_sent).await;
    let elapsed = start.elapsed();
    let cpu_us = relay.cpu_us()?.saturating_sub(cpu0);
    let total_received = received.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let latency = join_histograms(recv_tasks).await?;
    drop(open);
    drop(relay);
    Ok(Outcome {
        sent: total_sent,
        received: total_received,
        elapsed,
        latency,
        cpu_us,
        nodes: 1,
        db_cpu_us: None,
    })
}

fn params(a: &DeliveryArgs, rate: Option<f64>) -> Value {
    json!({
        "pairs": a.pairs, "payload_bytes": a.size, "server_depth": a.depth,
        "duration_s": a.duration, "max_messages_per_sender": a.max_messages,
        "ack_every": a.ack_every, "rate_per_sec": rate, "wire_version": a.wire_version,
        "store": "SQLCipher (durable, development key)",
    })
}

/// `a` with clients of wire version 2: one `enqueue` per message.
fn one_per_call(a: &DeliveryArgs) -> DeliveryArgs {
    DeliveryArgs {
        wire_version: 2,
        ..a.clone()
    }
}

/// `throughput`: as fast as possible; ratio of delivered messages/s.
pub async fn throughput(
    bin: &Path,
    core: Option<usize>,
    a: &DeliveryArgs,
) -> anyhow::Result<Report> {
    let pace = Pace { interval: None };
    let ours = run_server(bin, core, a, pace, &[]).await?;
    // Brackets: the same server with an unencrypted store (plain SQLite),
    // and with clients that send one message per call.
    let plain = run_server(bin, core, a, pace, &["--db-key", ""]).await?;
    let single = run_server(bin, core, &one_per_call(a), pace, &[]).await?;
    let peer = run_relay(core, a, pace).await?;
    let ratio = ours.per_sec() / peer.per_sec().max(1e-9);
    let mut figures = ours.figures();
    if let Some(o) = figures.as_object_mut() {
        o.insert("plain_sqlite_store".into(), plain.figures());
        o.insert("one_message_per_call".into(), single.figures());
    }
    Ok(Report {
        scenario: "throughput".into(),
        params: params(a, None),
        figures,
        peer: "raw quinn relay".into(),
        peer_figures: peer.figures(),
        ratio_of: "delivered_per_sec".into(),
        ratio: Some(ratio),
        target: ">= 0.5".into(),
        pass: Some(ratio >= 0.5 && ours.received == ours.sent),
        cpu_us_per_op: json!({"server": ours.cpu_per_msg(), "peer": peer.cpu_per_msg()}),
    })
}

/// `latency`: open loop at `rate` messages/s in total, both paths.
pub async fn latency(
    bin: &Path,
    core: Option<usize>,
    a: &DeliveryArgs,
    rate: f64,
) -> anyhow::Result<Report> {
    let pace = Pace::at(Some(rate), a)?;
    let ours = run_server(bin, core, a, pace, &[]).await?;
    let single = run_server(bin, core, &one_per_call(a), pace, &[]).await?;
    let peer = run_relay(core, a, pace).await?;
    let p99 = |h: &Histogram<u64>| h.value_at_quantile(0.99) as f64;
    let ratio = p99(&ours.latency) / p99(&peer.latency).max(1.0);
    let mut figures = ours.figures();
    if let Some(o) = figures.as_object_mut() {
        o.insert("one_message_per_call".into(), single.figures());
    }
    Ok(Report {
        scenario: "latency".into(),
        params: params(a, Some(rate)),
        figures,
        peer: "raw quinn relay".into(),
        peer_figures: peer.figures(),
        ratio_of: "latency p99".into(),
        ratio: Some(ratio),
        target: "<= 2".into(),
        pass: Some(ratio <= 2.0 && ours.received == ours.sent),
        cpu_us_per_op: json!({"server": ours.cpu_per_msg(), "peer": peer.cpu_per_msg()}),
    })
}

/// Bound on each phase of the offline path.
const OFFLINE_PHASE: Duration = Duration::from_secs(120);

/// The offline path through the server (durable SQLCipher store): `total`
/// messages (numbered, spread over `a.pairs` recipients, `a.depth`
/// enqueues in flight per sender) enqueued for recipients that registered
/// and disconnected, each acknowledged once committed; then the
/// recipients connect, authenticate and subscribe from the start of their
/// queue, and each must receive exactly its sender's numbers.
pub async fn offline(
    bin: &Path,
    core: Option<usize>,
    a: &DeliveryArgs,
    total: u64,
) -> anyhow::Result<Value> {
    let server = common::start_server_with(bin, core, None, &[])?;
    let pairs = a.pairs.max(1);
    let lanes = a.depth.max(1) as u64;
    let per = total / pairs as u64;
    let mut recipients = Vec::new();
    for i in 0..pairs {
        let (client, identity) = server_client(&server, &format!("offline-r{i}")).await?;
        drop(client);
        recipients.push(identity);
    }
    let mut senders = Vec::new();
    for i in 0..pairs {
        senders.push(server_client(&server, &format!("offline-s{i}")).await?.0);
    }
    let cpu0 = server.cpu_us()?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (client, to) in senders.iter().zip(&recipients) {
        let to = to.public_key();
        for lane in 0..lanes {
            let client = client.clone();
            let size = a.size;
            tasks.push(tokio::spawn(async move {
                let mut n = lane;
                while n < per {
                    let id = quicnprotochat_core::new_message_id(
                        &quicnprotochat_core::clock::SystemClock::new(),
                    )?;
                    client
                        .enqueue(&[to], id, payload(size, n))
                        .await
                        .context("enqueue")?;
                    n += lanes;
                }
                anyhow::Ok(())
            }));
        }
    }
    for t in tasks {
        tokio::time::timeout(OFFLINE_PHASE, t)
            .await
            .context("offline send phase")???;
    }
    let stored = start.elapsed();
    let cpu1 = server.cpu_us()?;
    let fetch_start = Instant::now();
    let mut tasks = Vec::new();
    for identity in recipients {
        let config = server.client_config();
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(config).await.context("connect")?;
            client.init_auth(&identity).await.context("auth")?;
            let mut sub = client.subscribe(1).await?;
            let mut got = Vec::new();
            let mut last = 0;
            while (got.len() as u64) < per {
                let Some(e) = sub.next().await else { break };
                if let Some(n) = stamp_of(&e.payload) {
                    got.push(n);
                }
                last = e.seq;
            }
            client.ack(last).await?;
            anyhow::Ok(got)
        }));
    }
    let mut received = 0u64;
    for (i, t) in tasks.into_iter().enumerate() {
        let mut got = tokio::time::timeout(OFFLINE_PHASE, t)
            .await
            .with_context(|| format!("offline fetch of offline-r{i}"))???;
        got.sort_unstable();
        anyhow::ensure!(
            got.iter().copied().eq(0..per),
            "the server delivered {} of {per} offline messages to offline-r{i} (or out of number)",
            got.len()
        );
        received += got.len() as u64;
    }
    let fetched = fetch_start.elapsed();
    let cpu2 = server.cpu_us()?;
    drop(senders);
    drop(server);
    Ok(crate::xmpp::offline_figures(
        per * pairs as u64,
        received,
        stored,
        fetched,
        cpu1.saturating_sub(cpu0),
        cpu2.saturating_sub(cpu1),
    ))
}
