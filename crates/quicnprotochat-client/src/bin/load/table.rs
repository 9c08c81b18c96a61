//! `table`: renders report lines (JSON, one per scenario per run) into the
//! results table of the benchmarks page, between the markers
//! `<!-- results:begin -->` and `<!-- results:end -->`.  With several runs
//! of a scenario, the run with the median ratio is shown, with every run's
//! ratio beside it.  The `postgres` and `push` scenarios (every node count,
//! the floor, push latency) go instead between `<!-- postgres:begin -->` and
//! `<!-- postgres:end -->`; each block is rewritten only when the input
//! holds lines for it.  With `--criterion`,
//! the criterion benchmarks' medians go between `<!-- criterion:begin -->`
//! and `<!-- criterion:end -->`.

use std::path::PathBuf;

use anyhow::{Context as _, anyhow};
use clap::Args;
use serde_json::Value;

const BEGIN: &str = "<!-- results:begin -->";
const END: &str = "<!-- results:end -->";
const PG_BEGIN: &str = "<!-- postgres:begin -->";
const PG_END: &str = "<!-- postgres:end -->";
/// The scenarios of the PostgreSQL block (not in the results table).
const PG_SCENARIOS: &[&str] = &["postgres", "push"];

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
            format!(
                "{} (one message per call: {})",
                n(f(&fig, &["delivered_per_sec"]), "msg/s"),
                n(
                    f(&fig, &["one_message_per_call", "delivered_per_sec"]),
                    "msg/s"
                )
            ),
            n(f(&peer, &["delivered_per_sec"]), "msg/s"),
        ),
        "latency" => (
            format!(
                "send-to-receive p99, open loop at {} msg/s",
                n(f(r, &["params", "rate_per_sec"]), "").trim()
            ),
            format!(
                "p50 {} / p99 {} (one message per call: p99 {})",
                n(f(&fig, &["latency", "p50_ms"]), "ms"),
                n(f(&fig, &["latency", "p99_ms"]), "ms"),
                n(
                    f(&fig, &["one_message_per_call", "latency", "p99_ms"]),
                    "ms"
                )
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
        "ngircd" => peer_row("ngIRCd (IRC over TLS, stores nothing)", r, &fig, &peer),
        "prosody" => peer_row(
            "Prosody (XMPP over TLS, relays online messages from memory)",
            r,
            &fig,
            &peer,
        ),
        "ejabberd" => peer_row(
            "ejabberd (XMPP over TLS, relays online messages from memory)",
            r,
            &fig,
            &peer,
        ),
        "synapse" => peer_row(
            "Synapse (Matrix over plain HTTP, SQLite: persists each message before answering)",
            r,
            &fig,
            &peer,
        ),
        "metrics" => (
            format!(
                "delivered msgs/s with the metrics endpoint scraped every {} s",
                num(f(r, &["params", "scrape_every"]))
            ),
            n(f(&fig, &["delivered_per_sec"]), "msg/s"),
            format!(
                "{} without it",
                n(f(&peer, &["delivered_per_sec"]), "msg/s")
            ),
        ),
        other => (other.to_string(), String::new(), String::new()),
    }
}

/// A chat-server peer's row: msgs/s; p99 at the run's rate; KiB per idle
/// connection, ours and the peer's.
fn peer_row(name: &str, r: &Value, fig: &Value, peer: &Value) -> (String, String, String) {
    let side = |v: &Value| {
        format!(
            "{}; {}; {}",
            n(f(v, &["throughput", "delivered_per_sec"]), "msg/s"),
            n(f(v, &["open_loop", "latency", "p99_ms"]), "ms"),
            n(f(v, &["kib_per_idle_connection"]), "KiB")
        )
    };
    (
        format!(
            "{name}: msgs/s; p99 at {} msg/s; KiB per idle connection",
            num(f(r, &["params", "rate_per_sec"]))
        ),
        side(fig),
        side(peer),
    )
}

/// The offline-path row of an XMPP peer's report line, when it has one:
/// (what, ours, peer's, ratios).
fn offline_row(r: &Value) -> Option<(String, String, String, String)> {
    let ours = r.get("figures")?.get("offline")?;
    let theirs = r.get("peer_figures")?.get("offline")?;
    let name = match r.get("scenario").and_then(Value::as_str)? {
        "prosody" => "Prosody",
        "ejabberd" => "ejabberd",
        _ => return None,
    };
    let side = |v: &Value| {
        format!(
            "{}; {}",
            n(f(v, &["stored_per_sec"]), "msg/s"),
            n(f(v, &["fetched_per_sec"]), "msg/s")
        )
    };
    let ratio = |k: &str| match (f(ours, &[k]), f(theirs, &[k])) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
        _ => "n/a".into(),
    };
    Some((
        format!(
            "{name} offline path: {} messages to logged-out users, stored msgs/s; fetched msgs/s (login to last)",
            num(f(r, &["params", "offline_messages"]))
        ),
        side(ours),
        side(theirs),
        format!(
            "{} stored, {} fetched",
            ratio("stored_per_sec"),
            ratio("fetched_per_sec")
        ),
    ))
}

/// A number without a unit.
fn num(x: Option<f64>) -> String {
    n(x, "").trim().to_string()
}

/// "p50 x / p99 y" of a figures object's `latency`.
fn p50_p99(v: &Value) -> String {
    format!(
        "p50 {} / p99 {}",
        n(f(v, &["latency", "p50_ms"]), "ms"),
        n(f(v, &["latency", "p99_ms"]), "ms")
    )
}

/// The node counts of a `postgres` line, as keys of its figures.
fn node_counts(r: &Value) -> Vec<String> {
    r.get("params")
        .and_then(|p| p.get("nodes"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .map(|k| k.to_string())
                .collect()
        })
        .unwrap_or_default()
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
        // Each block is rewritten only from lines that belong to it, so a
        // run of `postgres` alone leaves the results table as it was.
        let (pg, rest): (Vec<_>, Vec<_>) = read_runs(input)?
            .into_iter()
            .partition(|(s, _)| PG_SCENARIOS.contains(&s.as_str()));
        anyhow::ensure!(
            !pg.is_empty() || !rest.is_empty(),
            "no report lines in {}",
            input.display()
        );
        if !rest.is_empty() {
            page = replace_block(&page, BEGIN, END, &results(a, &rest))?;
        }
        if let Some(block) = postgres_block(a, &pg) {
            page = replace_block(&page, PG_BEGIN, PG_END, &block)?;
        }
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

/// The report lines of `input`, each with its scenario, in order.
fn read_runs(input: &std::path::Path) -> anyhow::Result<Vec<(String, Value)>> {
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let mut runs = Vec::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        let v: Value = serde_json::from_str(line)?;
        let s = v
            .get("scenario")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        runs.push((s, v));
    }
    Ok(runs)
}

/// The runs of scenario `s`, sorted by ratio.
fn sorted_runs<'a>(runs: &'a [(String, Value)], s: &str) -> Vec<&'a Value> {
    let mut these: Vec<&Value> = runs.iter().filter(|r| r.0 == s).map(|r| &r.1).collect();
    these.sort_by(|x, y| {
        let rx = f(x, &["ratio"]).unwrap_or(f64::NAN);
        let ry = f(y, &["ratio"]).unwrap_or(f64::NAN);
        rx.total_cmp(&ry)
    });
    these
}

/// The run of scenario `s` with the median ratio.
fn median<'a>(runs: &'a [(String, Value)], s: &str) -> Option<&'a Value> {
    let these = sorted_runs(runs, s);
    these.get(these.len() / 2).copied()
}

/// ", machine" or nothing.
fn machine(a: &TableArgs) -> String {
    if a.machine.is_empty() {
        String::new()
    } else {
        format!(", {}", a.machine)
    }
}

/// The load generator's results block.
fn results(a: &TableArgs, runs: &[(String, Value)]) -> String {
    let mut order: Vec<String> = Vec::new();
    for (s, _) in runs {
        if !order.contains(s) {
            order.push(s.clone());
        }
    }
    let mut rev = String::from("unknown");
    let mut rows = String::new();
    rows.push_str("| scenario | ours | peer | ratio (median; every run) | target | met |\n");
    rows.push_str("|---|---|---|---|---|---|\n");
    for s in &order {
        let these = sorted_runs(runs, s);
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
        if let Some((what, ours, peer, ratios)) = offline_row(mid) {
            rows.push_str(&format!(
                "| {what} | {ours} | {peer} | {ratios} | measured, no target | n/a |\n"
            ));
        }
    }
    let counts: Vec<usize> = order.iter().map(|s| sorted_runs(runs, s).len()).collect();
    let most = counts.iter().copied().max().unwrap_or(0);
    let fewest = counts.iter().copied().min().unwrap_or(0);
    let date = runs
        .first()
        .and_then(|r| r.1.get("unix_time"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    format!(
        "{BEGIN}\nRevision `{rev}`, unix time {date}{}, {} run(s) per scenario{}.\n\n{rows}{END}",
        machine(a),
        most,
        if fewest < most {
            format!(" ({fewest} for some)")
        } else {
            String::new()
        },
    )
}

/// Server + database CPU µs per message of a figures object.
fn total_cpu(v: &Value) -> Option<f64> {
    let server = f(v, &["server_cpu_us_per_msg"])?;
    Some(server + f(v, &["db_cpu_us_per_msg"]).unwrap_or(0.0))
}

/// The PostgreSQL block: the median-ratio run of `postgres` (every node
/// count beside SQLCipher and the floor) and of `push`.
fn postgres_block(a: &TableArgs, runs: &[(String, Value)]) -> Option<String> {
    let pg = median(runs, "postgres")?;
    let fig = pg.get("figures").cloned().unwrap_or(Value::Null);
    let peer = pg.get("peer_figures").cloned().unwrap_or(Value::Null);
    let rate = f(pg, &["params", "rate_per_sec"]);
    let rate_s = num(rate);
    let every = sorted_runs(runs, "postgres")
        .iter()
        .map(|r| f(r, &["ratio"]).map_or("n/a".into(), |x| format!("{x:.3}")))
        .collect::<Vec<_>>()
        .join(", ");
    let mut out = format!(
        "{PG_BEGIN}\nRevision `{}`, unix time {}{}; {}. Of the runs, the one whose ratio of 1-node PostgreSQL to SQLCipher messages/s is the median (every run: {every}).\n\n",
        pg.get("rev").and_then(Value::as_str).unwrap_or("unknown"),
        pg.get("unix_time").and_then(Value::as_u64).unwrap_or(0),
        machine(a),
        pg.get("params")
            .and_then(|p| p.get("pinning"))
            .and_then(Value::as_str)
            .unwrap_or("pinning unknown"),
    );
    out.push_str(&format!(
        "| configuration | delivered msgs/s (maximum) | server CPU µs/msg | database CPU µs/msg | server + database µs/msg | latency p50 / p99 at {rate_s} msg/s | server + database µs/msg at {rate_s} msg/s |\n|---|---|---|---|---|---|---|\n"
    ));
    let row = |name: &str, v: &Value| {
        let at = v.get("at_rate").cloned().unwrap_or(Value::Null);
        format!(
            "| {name} | {} | {} | {} | {} | {} | {} |\n",
            n(f(v, &["delivered_per_sec"]), "msg/s"),
            num(f(v, &["server_cpu_us_per_msg"])),
            f(v, &["db_cpu_us_per_msg"]).map_or("—".into(), |x| num(Some(x))),
            num(total_cpu(v)),
            p50_p99(&at),
            num(total_cpu(&at)),
        )
    };
    out.push_str(&row(
        "SQLCipher, 1 node (embedded store)",
        peer.get("sqlcipher").unwrap_or(&Value::Null),
    ));
    for k in node_counts(pg) {
        let name = match k.as_str() {
            "1" => "PostgreSQL, 1 node".to_string(),
            k => format!("PostgreSQL, {k} nodes (every message crosses nodes)"),
        };
        out.push_str(&row(
            &name,
            fig.get("nodes")
                .and_then(|v| v.get(&k))
                .unwrap_or(&Value::Null),
        ));
    }
    out.push_str(
        "\nPostgreSQL's floor in the same run: loops of single-row INSERT transactions (256-byte value, each committed and flushed), as many connections as the nodes' pools; beside it the same with a `pg_notify` in every transaction (as every enqueue does) and one listening connection per node:\n\n| floor | connections | commits/s | database CPU µs/commit | commit p50 / p99 |\n|---|---|---|---|---|\n",
    );
    for (what, name) in [
        ("floor", "INSERT + COMMIT"),
        ("floor_notify", "INSERT + pg_notify + COMMIT"),
    ] {
        for k in node_counts(pg) {
            let v = peer
                .get(what)
                .and_then(|v| v.get(&k))
                .unwrap_or(&Value::Null);
            out.push_str(&format!(
                "| {name} | {} | {} | {} | p50 {} / p99 {} |\n",
                f(v, &["connections"]).map_or("n/a".into(), |c| format!("{c:.0}")),
                num(f(v, &["commits_per_sec"])),
                num(f(v, &["db_cpu_us_per_commit"])),
                n(f(v, &["commit_latency", "p50_ms"]), "ms"),
                n(f(v, &["commit_latency", "p99_ms"]), "ms"),
            ));
        }
    }
    if let Some(push) = median(runs, "push") {
        let cross = push.get("figures").cloned().unwrap_or(Value::Null);
        let same = push.get("peer_figures").cloned().unwrap_or(Value::Null);
        let sq = same
            .get("sqlcipher_single_node")
            .cloned()
            .unwrap_or(Value::Null);
        out.push_str(&format!(
            "\nPush latency (send to receipt on a live subscription), one sender at {} msg/s for {} s, two PostgreSQL nodes running (the run with the median ratio of cross-node to same-node p99):\n\n| subscriber | p50 | p99 | max |\n|---|---|---|---|\n",
            num(f(push, &["params", "rate_per_sec"])),
            f(push, &["params", "duration_s"]).map_or("n/a".into(), |d| format!("{d:.0}")),
        ));
        for (name, v) in [
            ("on another node (PostgreSQL, LISTEN/NOTIFY)", &cross),
            ("on the sender's node (PostgreSQL)", &same),
            ("single node, SQLCipher", &sq),
        ] {
            out.push_str(&format!(
                "| {name} | {} | {} | {} |\n",
                n(f(v, &["latency", "p50_ms"]), "ms"),
                n(f(v, &["latency", "p99_ms"]), "ms"),
                n(f(v, &["latency", "max_ms"]), "ms"),
            ));
        }
    }
    out.push_str(PG_END);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(rate: f64, server: f64, db: f64) -> Value {
        json!({
            "delivered_per_sec": rate, "server_cpu_us_per_msg": server,
            "db_cpu_us_per_msg": db,
            "at_rate": {
                "latency": {"p50_ms": 3.0, "p99_ms": 9.0},
                "server_cpu_us_per_msg": 700.0, "db_cpu_us_per_msg": 1400.0,
            },
        })
    }

    fn postgres_line(ratio: f64, one_node_rate: f64) -> Value {
        let floor = |c: u64, rate: f64| {
            json!({"connections": c, "commits_per_sec": rate, "db_cpu_us_per_commit": 50.0,
                   "commit_latency": {"p50_ms": 0.5, "p99_ms": 1.5}})
        };
        json!({
            "scenario": "postgres", "rev": "abc1234", "unix_time": 1,
            "params": {"nodes": [1, 2], "rate_per_sec": 300.0, "pinning": "all on core 0"},
            "figures": {"nodes": {"1": node(one_node_rate, 320.0, 1000.0), "2": node(650.0, 340.0, 1100.0)}},
            "peer_figures": {
                "sqlcipher": {"delivered_per_sec": 18000.0, "server_cpu_us_per_msg": 52.0,
                              "at_rate": {"latency": {"p50_ms": 1.9, "p99_ms": 3.5},
                                          "server_cpu_us_per_msg": 560.0}},
                "floor": {"1": floor(8, 16000.0), "2": floor(16, 18000.0)},
                "floor_notify": {"1": floor(8, 5000.0), "2": floor(16, 4900.0)},
            },
            "ratio": ratio,
        })
    }

    #[test]
    fn postgres_lines_fill_their_own_block_and_leave_the_results_table() {
        let dir = tempfile::tempdir().unwrap();
        let page = dir.path().join("page.md");
        let results = format!("{BEGIN}\nold results\n{END}");
        std::fs::write(&page, format!("{results}\n\n{PG_BEGIN}\n{PG_END}\n")).unwrap();
        let input = dir.path().join("in.jsonl");
        let push = json!({
            "scenario": "push", "rev": "abc1234", "unix_time": 1,
            "params": {"rate_per_sec": 200.0, "duration_s": 5},
            "figures": {"latency": {"p50_ms": 4.0, "p99_ms": 8.0, "max_ms": 12.0}},
            "peer_figures": {"latency": {"p50_ms": 3.0, "p99_ms": 6.0, "max_ms": 9.0},
                             "sqlcipher_single_node": {"latency": {"p50_ms": 2.0, "p99_ms": 3.0, "max_ms": 5.0}}},
            "ratio": 1.33,
        });
        let lines = [
            postgres_line(0.05, 900.0),
            push,
            postgres_line(0.04, 725.0),
            postgres_line(0.03, 600.0),
        ];
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&input, text).unwrap();
        run(&TableArgs {
            input: Some(input),
            criterion: None,
            rev: "unknown".into(),
            page: page.clone(),
            machine: "test machine".into(),
        })
        .unwrap();
        let out = std::fs::read_to_string(&page).unwrap();
        assert!(out.starts_with(&results), "{out}");
        // the median-ratio run, every run's ratio
        assert!(out.contains("| PostgreSQL, 1 node | 725 msg/s | 320 | 1000 | 1320 | p50 3.00 ms / p99 9.00 ms | 2100 |"), "{out}");
        assert!(out.contains("every run: 0.030, 0.040, 0.050"), "{out}");
        assert!(
            out.contains("| PostgreSQL, 2 nodes (every message crosses nodes) | 650 msg/s |"),
            "{out}"
        );
        assert!(
            out.contains("| SQLCipher, 1 node (embedded store) | 18000 msg/s | 52.0 | — | 52.0 |"),
            "{out}"
        );
        assert!(
            out.contains(
                "| INSERT + pg_notify + COMMIT | 16 | 4900 | 50.0 | p50 0.50 ms / p99 1.50 ms |"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "| on another node (PostgreSQL, LISTEN/NOTIFY) | 4.00 ms | 8.00 ms | 12.0 ms |"
            ),
            "{out}"
        );
        assert!(out.contains("at 300 msg/s"), "{out}");
    }

    #[test]
    fn an_xmpp_peer_gets_its_row_and_its_offline_row() {
        let side = |rate: f64, stored: f64, fetched: f64| {
            json!({
                "throughput": {"delivered_per_sec": rate},
                "open_loop": {"latency": {"p99_ms": 3.0}},
                "kib_per_idle_connection": 50.0,
                "offline": {"stored_per_sec": stored, "fetched_per_sec": fetched},
            })
        };
        let line = json!({
            "scenario": "ejabberd", "rev": "abc1234", "unix_time": 1,
            "params": {"rate_per_sec": 2000.0, "offline_messages": 10000},
            "figures": side(18000.0, 4000.0, 30000.0),
            "peer_figures": side(20000.0, 8000.0, 10000.0),
            "ratio": 0.9, "target": "t", "pass": false,
        });
        let out = results(
            &TableArgs {
                input: None,
                criterion: None,
                rev: "unknown".into(),
                page: "unused".into(),
                machine: String::new(),
            },
            &[("ejabberd".into(), line)],
        );
        assert!(
            out.contains("| ejabberd (XMPP over TLS, relays online messages from memory): msgs/s; p99 at 2000 msg/s; KiB per idle connection | 18000 msg/s; 3.00 ms; 50.0 KiB | 20000 msg/s; 3.00 ms; 50.0 KiB | 0.900 (0.900) | t | **no** |"),
            "{out}"
        );
        assert!(
            out.contains("| ejabberd offline path: 10000 messages to logged-out users, stored msgs/s; fetched msgs/s (login to last) | 4000 msg/s; 30000 msg/s | 8000 msg/s; 10000 msg/s | 0.500 stored, 3.000 fetched | measured, no target | n/a |"),
            "{out}"
        );
    }
}
