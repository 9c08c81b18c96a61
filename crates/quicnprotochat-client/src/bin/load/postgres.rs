//! `postgres`: the delivery scenarios on the PostgreSQL store, with 1, 2
//! and 3 server nodes on one database, beside the single-node SQLCipher
//! server and PostgreSQL's own floor, all measured in the same run; and
//! `push`: send-to-receive latency across nodes beside the same on one node.
//!
//! One private PostgreSQL cluster (fsync on, synchronous_commit on,
//! full_page_writes on; Unix socket only) serves every run; each run gets a
//! fresh database and fresh server nodes, and a checkpoint just before it.
//! The cluster's postmaster and every process it forks are pinned to the
//! servers' core, so on a two-core machine the nodes and the database share
//! one core and the load generator has the other: the scaling is read from
//! CPU per message (server and database), not from the rate alone.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use quicnprotochat_client::harness::{PgCluster, PgClusterError, TestDatabase};
use serde_json::{Value, json};

use crate::common::{self, Proc, Report, histogram, micros, summary};
use crate::delivery::{self, DeliveryArgs, Outcome, Pace};

/// Options of the `postgres` scenario.
#[derive(Debug, Clone, Args)]
pub struct PgArgs {
    /// Server node counts, each measured on a database of its own.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 2, 3])]
    pub pg_nodes: Vec<usize>,
    /// Connections of each node's pool (the server's default); the floor
    /// runs as many connections per node.
    #[arg(long, default_value_t = 8)]
    pub pg_pool_size: usize,
    /// Total messages/s of the open-loop latency runs [default:
    /// `pg_fraction` × the lowest maximum rate measured, over the node
    /// counts, so that every configuration sustains it].
    #[arg(long)]
    pub pg_rate: Option<f64>,
    /// Fraction of the lowest measured maximum for the latency runs.
    #[arg(long, default_value_t = 0.5)]
    pub pg_fraction: f64,
    /// Seconds of each floor run (single-row INSERT + COMMIT loops).
    #[arg(long, default_value_t = 5)]
    pub floor_secs: u64,
    /// Upper bound on commits per floor connection.
    #[arg(long, default_value_t = 500_000)]
    pub floor_max_commits: u64,
    /// Messages/s of the push-latency runs (one sender, one subscriber).
    #[arg(long, default_value_t = 200.0)]
    pub push_rate: f64,
    /// Seconds of each push-latency run.
    #[arg(long, default_value_t = 5)]
    pub push_secs: u64,
}

/// The durable private cluster and its postmaster (stopped and removed on
/// drop).
#[derive(Debug)]
struct Db {
    cluster: PgCluster,
    postmaster: u32,
}

impl Db {
    /// Starts the cluster and pins it (postmaster, its children, and so
    /// every backend forked later) to `core`.
    async fn start(core: Option<usize>) -> anyhow::Result<Self> {
        let cluster = tokio::task::spawn_blocking(PgCluster::start_durable).await??;
        let (client, conn) =
            tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(conn);
        let backend: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .try_get(0)?;
        drop(client);
        let _ = conn.await;
        // A backend's parent is the postmaster.
        let postmaster = common::ppid(u32::try_from(backend)?)?;
        if let Some(c) = core {
            common::pin_tree(postmaster, c)?;
        }
        Ok(Self {
            cluster,
            postmaster,
        })
    }

    fn cpu_us(&self) -> anyhow::Result<u64> {
        common::tree_cpu_us(self.postmaster)
    }

    /// A checkpoint, so that no run pays for the previous one's dirty pages.
    async fn checkpoint(&self) -> anyhow::Result<()> {
        let (client, conn) =
            tokio_postgres::connect(&self.cluster.url("postgres"), tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(conn);
        client.batch_execute("CHECKPOINT").await?;
        drop(client);
        let _ = conn.await;
        Ok(())
    }
}

/// `n` server nodes on `db`, each with a data directory (certificate) and a
/// port of its own.
fn start_nodes(
    bin: &Path,
    core: Option<usize>,
    db: &TestDatabase,
    n: usize,
    pool: usize,
) -> anyhow::Result<Vec<Proc>> {
    let pool = pool.to_string();
    (0..n)
        .map(|_| {
            common::start_server_with(
                bin,
                core,
                None,
                &["--database-url", &db.url, "--database-pool-size", &pool],
            )
        })
        .collect()
}

/// One delivery run on `nodes` fresh nodes and a fresh database.
async fn pg_run(
    db: &Db,
    bin: &Path,
    core: Option<usize>,
    a: &DeliveryArgs,
    nodes: usize,
    pool: usize,
    rate: Option<f64>,
) -> anyhow::Result<Outcome> {
    let database = db.cluster.database().await?;
    let procs = start_nodes(bin, core, &database, nodes, pool)?;
    db.checkpoint().await?;
    let out = delivery::drive(&procs, a, Pace::at(rate, a)?, Some(db.postmaster)).await;
    // Nodes first (their connections end), then the database.
    drop(procs);
    drop(database);
    out.with_context(|| format!("PostgreSQL, {nodes} node(s)"))
}

/// What a floor run measured.
#[derive(Debug)]
struct Floor {
    commits: u64,
    elapsed: Duration,
    db_cpu_us: u64,
    latency: Histogram<u64>,
}

impl Floor {
    fn figures(&self, connections: usize, notify: bool) -> Value {
        json!({
            "connections": connections,
            "notify": notify,
            "commits": self.commits,
            "seconds": self.elapsed.as_secs_f64(),
            "commits_per_sec": self.commits as f64 / self.elapsed.as_secs_f64().max(1e-9),
            "db_cpu_us_per_commit":
                (self.commits > 0).then(|| self.db_cpu_us as f64 / self.commits as f64),
            "commit_latency": summary(&self.latency),
        })
    }
}

/// PostgreSQL's floor: `connections` connections, each a loop of one
/// single-row INSERT of a 256-byte value per transaction (autocommit: the
/// statement commits, and the commit waits for its WAL flush), for `secs`
/// seconds.  With `notify` each transaction also calls `pg_notify`, as the
/// server's enqueue does, with `listeners` connections listening (one per
/// node).
async fn floor(
    db: &Db,
    connections: usize,
    notify: bool,
    listeners: usize,
    size: usize,
    secs: u64,
    max: u64,
) -> anyhow::Result<Floor> {
    let database = db.cluster.database().await?;
    let out = floor_on(
        db,
        &database,
        connections,
        notify,
        listeners,
        size,
        secs,
        max,
    )
    .await;
    drop(database);
    out.with_context(|| format!("floor, {connections} connections"))
}

#[allow(clippy::too_many_arguments)]
async fn floor_on(
    db: &Db,
    database: &TestDatabase,
    connections: usize,
    notify: bool,
    listeners: usize,
    size: usize,
    secs: u64,
    max: u64,
) -> anyhow::Result<Floor> {
    let mut conns = Vec::new();
    let connect = || tokio_postgres::connect(&database.url, tokio_postgres::NoTls);
    let (admin, c) = connect().await?;
    conns.push(tokio::spawn(c));
    admin
        .batch_execute("CREATE TABLE floor (id bigserial PRIMARY KEY, data bytea NOT NULL)")
        .await?;
    // Listeners: their connection tasks read (and drop) the notifications.
    let mut listening = Vec::new();
    for _ in 0..if notify { listeners } else { 0 } {
        let (l, c) = connect().await?;
        conns.push(tokio::spawn(c));
        l.batch_execute("LISTEN floor").await?;
        listening.push(l);
    }
    let sql = if notify {
        "WITH i AS (INSERT INTO floor (data) VALUES ($1) RETURNING id)
         SELECT pg_notify('floor', id::text) FROM i"
    } else {
        "INSERT INTO floor (data) VALUES ($1)"
    };
    let mut workers = Vec::new();
    for _ in 0..connections {
        let (w, c) = connect().await?;
        conns.push(tokio::spawn(c));
        let stmt = w.prepare(sql).await?;
        workers.push((w, stmt));
    }
    db.checkpoint().await?;
    let payload = Arc::new(vec![0x5au8; size]);
    let cpu0 = db.cpu_us()?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for (w, stmt) in workers {
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = histogram()?;
            let mut n = 0u64;
            while n < max && Instant::now() < deadline {
                let t = Instant::now();
                w.query(&stmt, &[&payload.as_slice()]).await?;
                h.record(micros(t.elapsed()))?;
                n += 1;
            }
            anyhow::Ok((n, h))
        }));
    }
    let mut commits = 0;
    let mut latency = histogram()?;
    for t in tasks {
        let (n, h) = t.await??;
        commits += n;
        latency.add(h)?;
    }
    let elapsed = start.elapsed();
    let db_cpu_us = db.cpu_us()?.saturating_sub(cpu0);
    drop(listening);
    drop(admin);
    for c in conns {
        c.abort();
    }
    Ok(Floor {
        commits,
        elapsed,
        db_cpu_us,
        latency,
    })
}

/// Whether PostgreSQL is missing (the scenario is skipped in `all`).
pub fn not_installed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<PgClusterError>(),
            Some(PgClusterError::NotInstalled)
        )
    })
}

fn key(n: usize) -> String {
    n.to_string()
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// `postgres` and `push`: two report lines.
pub async fn run(
    bin: &Path,
    core: Option<usize>,
    a: &DeliveryArgs,
    p: &PgArgs,
) -> anyhow::Result<(Report, Report)> {
    anyhow::ensure!(
        !p.pg_nodes.is_empty() && p.pg_nodes.iter().all(|n| (1..=8).contains(n)),
        "--pg-nodes: between 1 and 8 nodes each"
    );
    anyhow::ensure!(
        (1..=100).contains(&p.pg_pool_size),
        "--pg-pool-size: 1 to 100"
    );
    let db = Db::start(core).await?;
    // Maximum rates: the SQLCipher server, then each node count.
    let sqlcipher = delivery::sqlcipher(bin, core, a, None).await?;
    let mut max = Vec::new();
    for &n in &p.pg_nodes {
        max.push(pg_run(&db, bin, core, a, n, p.pg_pool_size, None).await?);
    }
    let lowest = max
        .iter()
        .map(Outcome::per_sec)
        .fold(f64::INFINITY, f64::min);
    let rate = match p.pg_rate {
        Some(r) => r,
        None => lowest * p.pg_fraction,
    };
    anyhow::ensure!(
        rate.is_finite() && rate > 0.0,
        "no latency rate: the maximum rates were not measured"
    );
    // Open loop at one rate for every configuration.
    let sqlcipher_lat = delivery::sqlcipher(bin, core, a, Some(rate)).await?;
    let mut lat = Vec::new();
    for &n in &p.pg_nodes {
        lat.push(pg_run(&db, bin, core, a, n, p.pg_pool_size, Some(rate)).await?);
    }
    // The floor, with as many connections as the nodes' pools, without and
    // with a notification per commit.
    let mut floors = serde_json::Map::new();
    let mut floors_notify = serde_json::Map::new();
    for &n in &p.pg_nodes {
        let c = n * p.pg_pool_size;
        let plain = floor(&db, c, false, 0, a.size, p.floor_secs, p.floor_max_commits).await?;
        floors.insert(key(n), plain.figures(c, false));
        let notified = floor(&db, c, true, n, a.size, p.floor_secs, p.floor_max_commits).await?;
        floors_notify.insert(key(n), notified.figures(c, true));
    }
    // Push: one sender on node A at a low fixed rate, its subscriber on
    // node B, beside both on node A (B running alike).
    let push_args = DeliveryArgs {
        pairs: 1,
        depth: 1,
        duration: p.push_secs,
        ..a.clone()
    };
    let database = db.cluster.database().await?;
    let push = async {
        let procs = start_nodes(bin, core, &database, 2, p.pg_pool_size)?;
        let pace = Pace::at(Some(p.push_rate), &push_args)?;
        db.checkpoint().await?;
        let same = delivery::drive(&procs[..1], &push_args, pace, Some(db.postmaster)).await?;
        db.checkpoint().await?;
        let cross = delivery::drive(&procs, &push_args, pace, Some(db.postmaster)).await?;
        drop(procs);
        anyhow::Ok((same, cross))
    }
    .await;
    drop(database);
    let (same, cross) = push.context("push latency")?;
    let push_sqlcipher = delivery::sqlcipher(bin, core, &push_args, Some(p.push_rate)).await?;
    drop(db);

    let mut nodes = serde_json::Map::new();
    for ((n, m), l) in p.pg_nodes.iter().zip(&max).zip(&lat) {
        let mut v = m.figures();
        if let Some(o) = v.as_object_mut() {
            o.insert("at_rate".into(), l.figures());
        }
        nodes.insert(key(*n), v);
    }
    let mut sq = sqlcipher.figures();
    if let Some(o) = sq.as_object_mut() {
        o.insert("at_rate".into(), sqlcipher_lat.figures());
    }
    let pinning = match core {
        Some(c) => format!(
            "every server node and the database (postmaster and children) on core {c}; the load generator where it was started"
        ),
        None => "no pinning".into(),
    };
    let params = json!({
        "pairs": a.pairs, "payload_bytes": a.size, "server_depth": a.depth,
        "duration_s": a.duration, "max_messages_per_sender": a.max_messages,
        "ack_every": a.ack_every, "nodes": p.pg_nodes, "pool_size": p.pg_pool_size,
        "rate_per_sec": rate, "rate_fraction": p.pg_rate.is_none().then_some(p.pg_fraction),
        "floor_secs": p.floor_secs,
        "store": "PostgreSQL (private cluster, Unix socket; fsync, synchronous_commit and full_page_writes on)",
        "placement": "sender i on node i mod N, its receiver on node (i + 1) mod N",
        "pinning": pinning,
    });
    let first = max.first();
    let ratio = first.map(|m| m.per_sec() / sqlcipher.per_sec().max(1e-9));
    let complete = max.iter().chain(&lat).all(Outcome::complete);
    let postgres = Report {
        scenario: "postgres".into(),
        params,
        figures: json!({ "nodes": nodes, "all_delivered": complete }),
        peer: "single-node server on SQLCipher; PostgreSQL's floor".into(),
        peer_figures: json!({ "sqlcipher": sq, "floor": floors, "floor_notify": floors_notify }),
        ratio_of: format!(
            "delivered_per_sec, PostgreSQL with {} node(s) / SQLCipher",
            p.pg_nodes.first().copied().unwrap_or(1)
        ),
        ratio,
        target: "reported (no target)".into(),
        pass: None,
        cpu_us_per_op: json!({
            "server": first.and_then(Outcome::cpu_per_msg),
            "database": first.and_then(Outcome::db_cpu_per_msg),
            "peer": sqlcipher.cpu_per_msg(),
        }),
    };
    let push_ratio = ms(cross.latency(), 0.99) / ms(same.latency(), 0.99).max(1e-3);
    let mut same_fig = same.figures();
    if let Some(o) = same_fig.as_object_mut() {
        o.insert("sqlcipher_single_node".into(), push_sqlcipher.figures());
    }
    let push = Report {
        scenario: "push".into(),
        params: json!({
            "rate_per_sec": p.push_rate, "duration_s": p.push_secs, "payload_bytes": a.size,
            "store": "PostgreSQL, 2 nodes on one database",
            "placement": "sender on node A; subscriber on node B (figures) or on node A (peer)",
            "pinning": postgres.params.get("pinning"),
        }),
        figures: cross.figures(),
        peer: "both on one node (PostgreSQL); SQLCipher single node beside".into(),
        peer_figures: same_fig,
        ratio_of: "latency p99, cross-node / same node".into(),
        ratio: Some(push_ratio),
        target: "reported (no target)".into(),
        pass: None,
        cpu_us_per_op: json!({
            "server": cross.cpu_per_msg(), "database": cross.db_cpu_per_msg(),
            "peer": same.cpu_per_msg(),
        }),
    };
    Ok((postgres, push))
}
