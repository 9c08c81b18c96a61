//! `metrics`: what the operator endpoint costs under load, and whether its
//! counters agree with what the clients saw.  The throughput run of the
//! server twice: without the endpoint (the peer), then with
//! `--metrics-listen` scraped every `--scrape-every` seconds throughout.
//! The last scrape, taken after the run, is checked against the clients'
//! own counts and written to `--scrape-out`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use clap::Args;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::common::{self, Report};
use crate::delivery::{self, DeliveryArgs, Pace};

/// Options of `metrics`.
#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// Seconds between two scrapes during the run (Prometheus's default
    /// interval is 60 s, 15 s is common: 1 s overstates the cost).
    #[arg(long, default_value_t = 1.0)]
    pub scrape_every: f64,
    /// File the last scrape (after the run) is written to.
    #[arg(long)]
    pub scrape_out: Option<PathBuf>,
}

/// One `GET` over HTTP/1.1: the body of a `200` answer.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .context("the metrics endpoint did not answer within 10 s")??;
    let response = String::from_utf8(response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("not an HTTP answer"))?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(body.to_string())
}

/// The value of the unlabelled sample `name` in an exposition.
fn sample(text: &str, name: &str) -> anyhow::Result<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .ok_or_else(|| anyhow!("no sample {name}"))?
        .parse()
        .with_context(|| format!("the value of {name}"))
}

/// A free loopback TCP port for the endpoint.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// Runs the scenario.
pub async fn run(
    bin: &Path,
    core: Option<usize>,
    a: &DeliveryArgs,
    m: &MetricsArgs,
) -> anyhow::Result<Report> {
    anyhow::ensure!(
        m.scrape_every > 0.0 && m.scrape_every.is_finite(),
        "--scrape-every must be positive"
    );
    let pace = Pace::at(None, a)?;
    let without = delivery::sqlcipher(bin, core, a, None).await?;

    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let listen = addr.to_string();
    let server = common::start_server_with(bin, core, None, &["--metrics-listen", &listen])?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let every = Duration::from_secs_f64(m.scrape_every);
    let scraper = tokio::spawn(async move {
        let (mut scrapes, mut slowest) = (0u64, Duration::ZERO);
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = stop_rx.changed() => break,
            }
            let t = Instant::now();
            get(addr, "/metrics").await?;
            slowest = slowest.max(t.elapsed());
            scrapes += 1;
        }
        anyhow::Ok((scrapes, slowest))
    });
    let with = delivery::drive(std::slice::from_ref(&server), a, pace, None).await;
    let _ = stop_tx.send(true);
    let (scrapes, slowest) = scraper.await??;
    let with = with?;
    let last = get(addr, "/metrics").await?;
    drop(server);
    if let Some(path) = &m.scrape_out {
        std::fs::write(path, &last).with_context(|| format!("writing {}", path.display()))?;
    }

    let enqueued = sample(&last, "quicnprotochat_messages_enqueued_total")?;
    let pushed = sample(&last, "quicnprotochat_messages_pushed_total")?;
    let commits = sample(&last, "quicnprotochat_store_commit_seconds_count")?;
    let commit_secs = sample(&last, "quicnprotochat_store_commit_seconds_sum")?;
    let batched = sample(&last, "quicnprotochat_store_batch_size_sum")?;
    // The server counted what the clients saw: every acknowledged send
    // once, and at least every received message pushed.
    let agree = enqueued == with.sent() as f64 && pushed >= with.received() as f64;
    let ratio = with.per_sec() / without.per_sec().max(1e-9);
    let mut figures = with.figures();
    if let Some(o) = figures.as_object_mut() {
        o.insert(
            "endpoint".into(),
            json!({
                "scrapes": scrapes,
                "scrape_every_secs": m.scrape_every,
                "slowest_scrape_ms": slowest.as_secs_f64() * 1e3,
                "scrape_bytes": last.len(),
                "server_enqueued": enqueued,
                "server_pushed": pushed,
                "server_commits": commits,
                "server_mean_commit_ms": commit_secs / commits.max(1.0) * 1e3,
                "server_mean_writes_per_commit": batched / commits.max(1.0),
                "counters_agree_with_clients": agree,
            }),
        );
    }
    Ok(Report {
        scenario: "metrics".into(),
        params: json!({"pairs": a.pairs, "size": a.size, "depth": a.depth, "duration": a.duration,
            "scrape_every": m.scrape_every}),
        figures,
        peer: "the same server without the endpoint".into(),
        peer_figures: without.figures(),
        ratio_of: "delivered_per_sec".into(),
        ratio: Some(ratio),
        target: ">= 0.95 (metrics cost at most 5%), and the counters agree with the clients".into(),
        pass: Some(ratio >= 0.95 && agree),
        cpu_us_per_op: json!({"server": with.cpu_per_msg(), "peer": without.cpu_per_msg()}),
    })
}
