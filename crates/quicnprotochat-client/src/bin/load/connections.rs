//! `connections`: many idle authenticated connections on one server.
//!
//! Opens connections in steps (by default 1 000, 10 000, 50 000, 100 000)
//! from several loopback source addresses (127.0.0.2 …, the per-address cap
//! raised through the run's configuration file), authenticates each, and
//! keeps them idle with QUIC keep-alives.  At each step: the time to reach
//! it, the server's RSS per connection, the server's CPU while idle, and
//! whether a `health` call and a message round trip (sender to a push
//! subscriber, both already connected) still answer within 100 ms.  The
//! load generator holds its sessions on one thread ([`IdleSession`]s on a
//! `LocalSet`, one UDP socket per source address: no file descriptor per
//! connection on either side).  A step that fails ends the run and its
//! cause is reported.  The peer: a raw quinn server holding idle
//! connections.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use clap::Args;
use quicnprotochat_client::IdleSession;
use quicnprotochat_core::Identity;
use serde_json::{Value, json};

use crate::common::{self, Proc, Report};
use crate::delivery::server_client;
use crate::relay;

/// Options of `connections`.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// Connection counts to reach, in order.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000, 10_000, 50_000, 100_000])]
    pub steps: Vec<usize>,
    /// Loopback source addresses the connections come from (127.0.0.2 on).
    #[arg(long, default_value_t = 16)]
    pub sources: usize,
    /// Handshakes in flight while a step is reached.
    #[arg(long, default_value_t = 64)]
    pub open_concurrency: usize,
    /// Longest time to reach one step, in seconds.
    #[arg(long, default_value_t = 600)]
    pub step_timeout: u64,
    /// Seconds of idleness measured at each step.
    #[arg(long, default_value_t = 10)]
    pub idle_secs: u64,
    /// Idle connections of the raw quinn peer.
    #[arg(long, default_value_t = 10_000)]
    pub peer_connections: usize,
    /// The server's `limits.max_connections` [default: twice the largest
    /// step plus 1 000, so no step reaches the half above which the server
    /// asks new clients to prove their address with a stateless Retry; set
    /// it lower to measure that regime].
    #[arg(long)]
    pub max_connections: Option<usize>,
}

/// The run's server configuration: connection caps above the largest
/// step (per source address too), logins unthrottled, connections kept
/// past the idle measurement.  The overall cap is twice the largest step:
/// above half of it the server makes every new client prove its address
/// first (a stateless Retry), which is measured on its own (see the
/// benchmarks page), not here.
fn server_toml(max: usize, sources: usize, cap: Option<usize>) -> String {
    let per_source = max.div_ceil(sources.max(1)) + 100;
    let cap = cap.unwrap_or(2 * max + 1_000);
    format!(
        "[limits]\nmax_connections = {cap}\nmax_connections_per_ip = {per_source}\nidle_timeout_secs = 600\n\
         auth_timeout_secs = 120\n\n[limits.rates]\n\
         auth_per_ip = {{ per_second = 1000000, burst = 1000000 }}\n\
         enqueue_per_identity = {{ per_second = 1000000, burst = 1000000 }}\n\
         enqueue_per_ip = {{ per_second = 1000000, burst = 1000000 }}\n"
    )
}

/// The resident set of this process, KiB.
fn own_rss_kib() -> anyhow::Result<u64> {
    common::rss_kib(&std::process::id().to_string())
}

/// What the probes measured at one step.
struct Probes {
    health_ms: f64,
    round_trip_ms: f64,
}

/// A `health` call on a connected client, and a message from a connected
/// sender to a connected push subscriber.
async fn probe(
    prober: &quicnprotochat_client::Client,
    sender: &quicnprotochat_client::Client,
    to: quicnprotochat_core::IdentityKey,
    sub: &mut quicnprotochat_client::Subscription,
    n: u64,
) -> anyhow::Result<Probes> {
    let t = Instant::now();
    let h = tokio::time::timeout(Duration::from_secs(10), prober.health())
        .await
        .context("health: no answer within 10 s")??;
    anyhow::ensure!(h.ok, "the server reports not ready");
    let health_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    let t = Instant::now();
    sender.enqueue(&[to], id, b"probe".to_vec()).await?;
    let e = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .context("round trip: nothing pushed within 10 s")?
        .ok_or_else(|| anyhow!("the subscription ended"))?;
    anyhow::ensure!(e.message_id == id, "pushed another message");
    Ok(Probes {
        health_ms,
        round_trip_ms: t.elapsed().as_secs_f64() * 1e3,
    })
}

/// Attempts at one session before the step fails: a client whose
/// connection attempt fails tries again, as the client library's
/// supervisor does.
const ATTEMPTS: u32 = 3;

/// Opens sessions from `endpoints` (round robin) until `held` has `target`,
/// `concurrency` handshakes in flight (a slow one holds only its own slot),
/// within `timeout`.  Returns the attempts that failed and were made
/// again, with the last such error.
async fn reach(
    held: &mut Vec<IdleSession>,
    target: usize,
    endpoints: &[quinn::Endpoint],
    config: &quicnprotochat_client::ClientConfig,
    concurrency: usize,
    timeout: Duration,
) -> anyhow::Result<(u64, Option<String>)> {
    let deadline = Instant::now() + timeout;
    let (mut failed, mut last_error) = (0u64, None);
    let mut opening = tokio::task::JoinSet::new();
    let mut started = held.len();
    while held.len() < target {
        while started < target && opening.len() < concurrency.max(1) {
            let endpoint = endpoints[started % endpoints.len()].clone();
            let config = config.clone();
            opening.spawn_local(async move {
                let identity = Identity::generate()?;
                let mut errors = Vec::new();
                for _ in 0..ATTEMPTS {
                    let attempt = IdleSession::open(&endpoint, &config, &identity);
                    match tokio::time::timeout(config.connect_timeout, attempt).await {
                        Ok(Ok(s)) => return anyhow::Ok((s, errors)),
                        Ok(Err(e)) => errors.push(e.to_string()),
                        Err(_) => {
                            errors.push(format!("no session within {:?}", config.connect_timeout))
                        }
                    }
                }
                Err(anyhow!(
                    "{ATTEMPTS} attempts failed, the last: {}",
                    errors.last().map_or("", String::as_str)
                ))
            });
            started += 1;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let next = tokio::time::timeout(left, opening.join_next())
            .await
            .map_err(|_| anyhow!("{} of {target} connections after {timeout:?}", held.len()))?;
        let Some(done) = next else { break };
        let (session, errors) = done.context("a session task failed")??;
        failed += errors.len() as u64;
        if let Some(e) = errors.into_iter().last() {
            last_error = Some(e);
        }
        held.push(session);
    }
    Ok((failed, last_error))
}

/// Runs the scenario.
pub async fn run(bin: &Path, core: Option<usize>, a: &ConnArgs) -> anyhow::Result<Report> {
    let steps: Vec<usize> = a.steps.iter().copied().filter(|s| *s > 0).collect();
    let max = steps
        .iter()
        .copied()
        .max()
        .ok_or_else(|| anyhow!("no steps"))?;
    anyhow::ensure!((1..=250).contains(&a.sources), "--sources must be 1 to 250");
    let server = common::start_server_configured(
        bin,
        core,
        None,
        &[],
        &server_toml(max, a.sources, a.max_connections),
    )?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = server.rss_kib()?;
    let own0 = own_rss_kib()?;
    let config = server.client_config();
    let (prober, _) = server_client(&server, "prober").await?;
    let (sender, _) = server_client(&server, "sender").await?;
    let (receiver, receiver_id) = server_client(&server, "receiver").await?;
    let mut sub = receiver.subscribe(1).await?;
    let to = receiver_id.public_key();

    let local = tokio::task::LocalSet::new();
    let (steps_done, stopped) = local
        .run_until(async {
            let mut endpoints = Vec::new();
            for i in 0..a.sources {
                let last = u8::try_from(i + 2).map_err(|_| anyhow!("too many sources"))?;
                let bind = SocketAddr::from((Ipv4Addr::new(127, 0, 0, last), 0));
                endpoints.push(IdleSession::endpoint(bind, &config)?);
            }
            let mut held: Vec<IdleSession> = Vec::new();
            let mut done: Vec<Value> = Vec::new();
            let mut stopped = None;
            for (n, &step) in steps.iter().enumerate() {
                let t = Instant::now();
                let retried = match reach(
                    &mut held,
                    step,
                    &endpoints,
                    &config,
                    a.open_concurrency,
                    Duration::from_secs(a.step_timeout),
                )
                .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        stopped = Some(format!("at {} connections: {e:#}", held.len()));
                        break;
                    }
                };
                let reached_secs = t.elapsed().as_secs_f64();
                let cpu0 = server.cpu_us()?;
                let idle0 = Instant::now();
                tokio::time::sleep(Duration::from_secs(a.idle_secs)).await;
                let idle_cpu = (server.cpu_us()? - cpu0) as f64
                    / idle0.elapsed().as_secs_f64().max(1e-9)
                    / 1e6;
                let lost = held.iter().filter(|s| s.is_closed()).count();
                let probes = match probe(&prober, &sender, to, &mut sub, n as u64).await {
                    Ok(p) => p,
                    Err(e) => {
                        stopped = Some(format!("at {step} connections, the probe: {e:#}"));
                        break;
                    }
                };
                let rss = server.rss_kib()?;
                let own = own_rss_kib()?;
                let kib = (rss.saturating_sub(rss0)) as f64 / step as f64;
                eprintln!(
                    "connections: {step} held in {reached_secs:.1} s ({} attempts failed and made again), {kib:.1} KiB each, idle CPU {:.1}% of a core, health {:.1} ms, round trip {:.1} ms, {lost} lost",
                    retried.0,
                    idle_cpu * 100.0,
                    probes.health_ms,
                    probes.round_trip_ms
                );
                done.push(json!({
                    "connections": step,
                    "seconds_to_reach": reached_secs,
                    "handshakes_per_sec": (step - if n == 0 { 0 } else { steps[n - 1] }) as f64 / reached_secs.max(1e-9),
                    "server_rss_kib": rss,
                    "server_kib_per_connection": kib,
                    "server_idle_cpu_cores": idle_cpu,
                    "load_generator_kib_per_connection": (own.saturating_sub(own0)) as f64 / step as f64,
                    "health_ms": probes.health_ms,
                    "round_trip_ms": probes.round_trip_ms,
                    "answers_within_100_ms": probes.health_ms < 100.0 && probes.round_trip_ms < 100.0,
                    "closed_while_idle": lost,
                    "attempts_failed_and_made_again": retried.0,
                    "last_failed_attempt": retried.1,
                }));
                if lost > 0 {
                    stopped = Some(format!("at {step} connections: {lost} closed while idle"));
                    break;
                }
            }
            drop(held);
            anyhow::Ok((done, stopped))
        })
        .await?;
    drop((prober, sender, receiver, sub));
    drop(server);

    let peer = peer_idle(core, a.peer_connections).await?;
    let last = steps_done.last().cloned().unwrap_or(Value::Null);
    let held = last.get("connections").and_then(Value::as_u64).unwrap_or(0);
    let ours = last
        .get("server_kib_per_connection")
        .and_then(Value::as_f64);
    let theirs = peer.get("kib_per_connection").and_then(Value::as_f64);
    let ratio = ours.zip(theirs).map(|(o, t)| o / t.max(1e-9));
    let all_answered = steps_done
        .iter()
        .all(|s| s.get("answers_within_100_ms") == Some(&Value::Bool(true)));
    Ok(Report {
        scenario: "connections".into(),
        params: json!({"steps": steps, "sources": a.sources, "open_concurrency": a.open_concurrency,
            "idle_secs": a.idle_secs, "max_connections": a.max_connections.unwrap_or(2 * max + 1_000)}),
        figures: json!({"steps": steps_done, "held": held, "stopped": stopped}),
        peer: format!(
            "raw quinn server holding {} idle connections",
            a.peer_connections
        ),
        peer_figures: peer,
        ratio_of: "server KiB per idle connection at the largest step held".into(),
        ratio,
        target: format!("{max} held, answering within 100 ms, ratio <= 2"),
        pass: Some(
            held == max as u64
                && stopped.is_none()
                && all_answered
                && ratio.is_some_and(|r| r <= 2.0),
        ),
        cpu_us_per_op: json!(null),
    })
}

/// The raw quinn relay holding `k` idle connections: KiB per connection.
async fn peer_idle(core: Option<usize>, k: usize) -> anyhow::Result<Value> {
    let relay: Proc = common::start_relay(core, 900)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = relay.rss_kib()?;
    let ep = relay::client_endpoint(relay.fingerprint)?;
    let t = Instant::now();
    let mut conns = Vec::with_capacity(k);
    while conns.len() < k {
        let batch = (k - conns.len()).min(64);
        let mut opening = Vec::with_capacity(batch);
        for _ in 0..batch {
            opening.push(ep.connect(relay.addr, "localhost")?);
        }
        for o in opening {
            conns.push(o.await?);
        }
    }
    let secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = relay.rss_kib()?;
    drop(conns);
    Ok(json!({
        "connections": k,
        "seconds_to_reach": secs,
        "rss_kib": rss,
        "kib_per_connection": (rss.saturating_sub(rss0)) as f64 / k.max(1) as f64,
    }))
}
