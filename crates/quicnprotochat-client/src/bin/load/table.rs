//! `table`: renders report lines (JSON, one per scenario per run) into the
//! results table of the benchmarks page, between the markers
//! `<!-- results:begin -->` and `<!-- results:end -->`.  With several runs
//! of a scenario, the run with the median ratio is shown, with every run's
//! ratio beside it.  With `--criterion`, the criterion benchmarks' medians
//! go between `<!-- criterion:begin -->` and `<!-- criterion:end -->`.

use std::path::PathBuf;

use anyhow::{Context as _, anyhow};
use clap::Args;
use serde_json::Value;

const BEGIN: &str = "<!-- results:begin -->";
const END: &str = "<!-- results:end -->";

/// Options of `table`.
#[derive(Debug, Clone, Args)]
pub struct TableArgs {
    /// Report lines (the output of `all`, possibly several runs).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// criterion's output directory (`target/criterion`) of a run of the
    /// `mls` and `store` benchmarks.
    #[arg(long)]
    pub criterion: Option<PathBuf>,
    /// Revision for the criterion block's heading.
    #[arg(long, env = "QUICNPROTOCHAT_REV", default_value = "unknown")]
    pub rev: String,
    /// The page to update.
    #[arg(long)]
    pub page: PathBuf,
    /// Machine description for the table's heading.
    #[arg(long, default_value = "")]
    pub machine: String,
}

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_f64()
}

fn n(x: Option<f64>, unit: &str) -> String {
    match x {
        Some(x) if x >= 100.0 => format!("{x:.0} {unit}"),
        Some(x) if x >= 10.0 => format!("{x:.1} {unit}"),
        Some(x) => format!("{x:.2} {unit}"),
        None => "n/a".into(),
    }
}

/// (what, ours, peer's) for one report line.
fn describe(r: &Value) -> (String, String, String) {
    let fig = r.get("figures").cloned().unwrap_or(Value::Null);
    let peer = r.get("peer_figures").cloned().unwrap_or(Value::Null);
    match r.get("scenario").and_then(Value::as_str).unwrap_or("") {
        "throughput" => (
            "delivered msgs/s, 10 pairs, 256 B, durable SQLCipher".into(),
            n(f(&fig, &["delivered_per_sec"]), "msg/s"),
            n(f(&peer, &["delivered_per_sec"]), "msg/s"),
        ),
        "latency" => (
            format!(
                "send-to-receive p99, open loop at {} msg/s",
                n(f(r, &["params", "rate_per_sec"]), "").trim()
            ),
            format!(
                "p50 {} / p99 {}",
                n(f(&fig, &["latency", "p50_ms"]), "ms"),
                n(f(&fig, &["latency", "p99_ms"]), "ms")
            ),
            format!(
                "p50 {} / p99 {}",
                n(f(&peer, &["latency", "p50_ms"]), "ms"),
                n(f(&peer, &["latency", "p99_ms"]), "ms")
            ),
        ),
        "p2p" => (
            "P2P over iroh: latency p50 (1 in flight); msgs/s at 32 in flight".into(),
            format!(
                "{}; {} (server path p50 {})",
                n(f(&fig, &["latency_1_in_flight", "p50_ms"]), "ms"),
                n(f(&fig, &["msgs_per_sec"]), "msg/s"),
                n(
                    f(&fig, &["server_path", "latency_1_in_flight", "p50_ms"]),
                    "ms"
                )
            ),
            format!(
                "{}; {}",
                n(f(&peer, &["latency_1_in_flight", "p50_ms"]), "ms"),
                n(f(&peer, &["msgs_per_sec"]), "msg/s")
            ),
        ),
        "fanout" => {
            let per = |v: &Value| {
                ["G=2", "G=10", "G=50", "G=200"]
                    .iter()
                    .map(|g| {
                        n(f(v, &[g, "server_cpu_us_per_recipient"]), "")
                            .trim()
                            .to_string()
                    })
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            (
                "fan-out: CPU µs per recipient, G = 2 / 10 / 50 / 200".into(),
                per(&fig),
                per(&peer),
            )
        }
        "coldstart" => (
            "cold start to first handshake: empty / 100 000 queued".into(),
            format!(
                "{} / {}",
                n(f(&fig, &["empty_store_median_ms"]), "ms"),
                n(f(&fig, &["queued_store_median_ms"]), "ms")
            ),
            n(f(&peer, &["median_ms"]), "ms"),
        ),
        "idle-memory" => (
            "RSS per idle authenticated connection, K = 1000".into(),
            n(f(&fig, &["kib_per_connection"]), "KiB"),
            n(f(&peer, &["kib_per_connection"]), "KiB"),
        ),
        other => (other.to_string(), String::new(), String::new()),
    }
}

/// `table`.
pub fn run(a: &TableArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.input.is_some() || a.criterion.is_some(),
        "nothing to render: give --input, --criterion or both"
    );
    let mut page = std::fs::read_to_string(&a.page)
        .with_context(|| format!("reading {}", a.page.display()))?;
    if let Some(input) = &a.input {
        page = replace_block(&page, BEGIN, END, &results(a, input)?)?;
    }
    if let Some(dir) = &a.criterion {
        let heading = format!(
            "Revision `{}`{}; criterion's median of each benchmark.",
            a.rev,
            if a.machine.is_empty() {
                String::new()
            } else {
                format!(", {}", a.machine)
            },
        );
        let block = crate::criterion::render(dir, &heading)?;
        page = replace_block(
            &page,
            crate::criterion::BEGIN,
            crate::criterion::END,
            &block,
        )?;
    }
    std::fs::write(&a.page, page)?;
    Ok(())
}

/// `page` with the text from `begin` to `end` (markers included) replaced.
fn replace_block(page: &str, begin: &str, end: &str, block: &str) -> anyhow::Result<String> {
    let start = page
        .find(begin)
        .ok_or_else(|| anyhow!("no {begin} in the page"))?;
    let stop = page
        .find(end)
        .ok_or_else(|| anyhow!("no {end} in the page"))?
        + end.len();
    anyhow::ensure!(start < stop, "markers out of order");
    Ok(format!("{}{block}{}", &page[..start], &page[stop..]))
}

/// The load generator's results block.
fn results(a: &TableArgs, input: &std::path::Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let mut order: Vec<String> = Vec::new();
    let mut runs: Vec<(String, Value)> = Vec::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        let v: Value = serde_json::from_str(line)?;
        let s = v
            .get("scenario")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        if !order.contains(&s) {
            order.push(s.clone());
        }
        runs.push((s, v));
    }
    let mut rev = String::from("unknown");
    let mut rows = String::new();
    rows.push_str("| scenario | ours | peer | ratio (median; every run) | target | met |\n");
    rows.push_str("|---|---|---|---|---|---|\n");
    for s in &order {
        let mut these: Vec<&Value> = runs.iter().filter(|r| &r.0 == s).map(|r| &r.1).collect();
        these.sort_by(|x, y| {
            let rx = f(x, &["ratio"]).unwrap_or(f64::NAN);
            let ry = f(y, &["ratio"]).unwrap_or(f64::NAN);
            rx.total_cmp(&ry)
        });
        let Some(mid) = these.get(these.len() / 2) else {
            continue;
        };
        if let Some(r) = mid.get("rev").and_then(Value::as_str) {
            rev = r.to_string();
        }
        let all = these
            .iter()
            .map(|r| f(r, &["ratio"]).map_or("n/a".into(), |x| format!("{x:.3}")))
            .collect::<Vec<_>>()
            .join(", ");
        let (what, ours, peer) = describe(mid);
        let met = match mid.get("pass").and_then(Value::as_bool) {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "n/a",
        };
        rows.push_str(&format!(
            "| {what} | {ours} | {peer} | {} ({all}) | {} | {met} |\n",
            f(mid, &["ratio"]).map_or("n/a".into(), |x| format!("{x:.3}")),
            mid.get("target").and_then(Value::as_str).unwrap_or(""),
        ));
    }
    let date = runs
        .first()
        .and_then(|r| r.1.get("unix_time"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let block = format!(
        "{BEGIN}\nRevision `{rev}`, unix time {date}{}, {} run(s) per scenario.\n\n{rows}{END}",
        if a.machine.is_empty() {
            String::new()
        } else {
            format!(", {}", a.machine)
        },
        runs.len() / order.len().max(1),
    );
    Ok(block)
}
