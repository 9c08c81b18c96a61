//! `quicnprotochat-load`: the benchmark suite's load generator.
//!
//! Every scenario runs its peer in the same invocation and prints one JSON
//! line: our figures, the peer's, their ratio against the target, CPU time
//! per operation and the git revision.  Servers run as child processes on
//! loopback (the real `quicnprotochat-server` binary, durable SQLCipher store
//! in a temporary directory, limits raised by a config file), pinned with
//! `taskset` to `--server-core` (default 0); run this binary itself pinned to
//! the other core (`taskset -c 1 quicnprotochat-load …`).
//!
//! Scenarios: `throughput` (delivered messages/s, server vs raw quinn relay),
//! `latency` (open loop at a fraction of the measured maximum, latency from
//! the intended send time), `p2p` (direct delivery over iroh vs raw quinn
//! request/response, beside the server path), `fanout` (server CPU per
//! recipient against group size, beside the relay), `postgres` (the
//! PostgreSQL store with 1, 2 and 3 nodes on one database, beside the
//! SQLCipher server and PostgreSQL's own floor; then cross-node push
//! latency beside the same on one node), `metrics` (the throughput run with
//! the operator endpoint scraped throughout, beside the same without it;
//! the server's counters checked against the clients'), `backup` (the
//! `backup` and `rekey` subcommands on a store of queued messages beside a
//! plain file copy; not part of `all`), `ngircd` (the IRC server ngIRCd
//! over TLS beside ours: msgs/s, p99 at one rate, CPU per message, memory
//! per idle connection), `prosody` and `ejabberd` (the same beside the
//! XMPP servers Prosody and ejabberd over direct TLS, plus the offline
//! path: messages stored for logged-out users, then fetched at login),
//! `synapse` (the same first four beside the Matrix homeserver Synapse:
//! room messages through the client-server API, received by `/sync`),
//! `connections` (idle authenticated
//! connections in steps up to 100 000, beside a raw quinn server; not part
//! of `all`), `all`.

#[path = "load/backup.rs"]
mod backup;
#[path = "load/common.rs"]
mod common;
#[path = "load/connections.rs"]
mod connections;
#[path = "load/criterion.rs"]
mod criterion;
#[path = "load/delivery.rs"]
mod delivery;
#[path = "load/fanout.rs"]
mod fanout;
#[path = "load/irc.rs"]
mod irc;
#[path = "load/metrics.rs"]
mod metrics;
#[path = "load/p2p.rs"]
mod p2p;
#[path = "load/peer.rs"]
mod peer;
#[path = "load/postgres.rs"]
mod postgres;
#[path = "load/relay.rs"]
mod relay;
#[path = "load/startup.rs"]
mod startup;
#[path = "load/synapse.rs"]
mod synapse;
#[path = "load/table.rs"]
mod table;
#[path = "load/xmpp.rs"]
mod xmpp;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use backup::BackupArgs;
use common::Report;
use delivery::DeliveryArgs;
use fanout::FanoutArgs;
use p2p::P2pArgs;
use postgres::PgArgs;
use startup::{ColdArgs, IdleArgs};
use table::TableArgs;

/// Benchmark load generator: each scenario beside its peer, one JSON line each.
#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    #[command(flatten)]
    global: Global,
}

/// Options of `all`: every scenario's.
#[derive(Debug, Args)]
struct AllArgs {
    #[command(flatten)]
    args: DeliveryArgs,
    #[command(flatten)]
    p2p: P2pArgs,
    #[command(flatten)]
    fanout: FanoutArgs,
    #[command(flatten)]
    cold: ColdArgs,
    #[command(flatten)]
    idle: IdleArgs,
    #[command(flatten)]
    pg: PgArgs,
    #[command(flatten)]
    metrics: metrics::MetricsArgs,
    #[command(flatten)]
    irc: irc::IrcArgs,
    #[command(flatten)]
    xmpp: xmpp::XmppArgs,
    #[command(flatten)]
    synapse: synapse::SynapseArgs,
    /// Leave out the chat-server peers (ngircd, prosody, ejabberd,
    /// synapse): scripts/bench runs them in its first run only.
    #[arg(long)]
    no_chat_peers: bool,
    /// Leave out `postgres`: scripts/bench runs it in its first run only.
    #[arg(long)]
    no_postgres: bool,
}

/// Options of every scenario.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// The server executable [default: quicnprotochat-server beside this one].
    #[arg(long, global = true)]
    server_bin: Option<PathBuf>,
    /// Core the server (and each peer server) is pinned to with taskset;
    /// negative: no pinning.
    #[arg(long, global = true, default_value_t = 0, allow_hyphen_values = true)]
    server_core: i64,
}

impl Global {
    fn core(&self) -> Option<usize> {
        usize::try_from(self.server_core).ok()
    }
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Delivered messages/s through the server vs the raw quinn relay.
    Throughput(DeliveryArgs),
    /// Open-loop send-to-receive latency at a fraction of the maximum rate.
    Latency {
        #[command(flatten)]
        args: DeliveryArgs,
        /// Total messages/s [default: `fraction` × the server's maximum,
        /// measured first].
        #[arg(long)]
        rate: Option<f64>,
        /// Fraction of the measured maximum rate.
        #[arg(long, default_value_t = 0.5)]
        fraction: f64,
    },
    /// Direct delivery over iroh vs raw quinn, beside the server path.
    P2p(P2pArgs),
    /// Server CPU per recipient against group size.
    Fanout(FanoutArgs),
    /// Exec to first handshake: empty store, then with queued messages.
    Coldstart(ColdArgs),
    /// Server memory per idle authenticated connection.
    IdleMemory(IdleArgs),
    /// Time of `backup` (and `rekey`) on a store of queued messages beside
    /// a plain file copy.
    Backup(BackupArgs),
    /// The PostgreSQL store with 1, 2, 3 nodes beside SQLCipher and the
    /// database's floor; cross-node push latency.
    Postgres {
        #[command(flatten)]
        args: DeliveryArgs,
        #[command(flatten)]
        pg: PgArgs,
    },
    /// Idle authenticated connections in steps up to 100 000: memory and
    /// idle CPU per connection, time to reach each step, and whether the
    /// server still answers within 100 ms; beside a raw quinn server.
    Connections(connections::ConnArgs),
    /// The IRC server ngIRCd over TLS beside ours: msgs/s, p99 at one rate,
    /// CPU per message, memory per idle connection.
    Ngircd {
        #[command(flatten)]
        args: DeliveryArgs,
        #[command(flatten)]
        irc: irc::IrcArgs,
    },
    /// The XMPP server Prosody over direct TLS beside ours: msgs/s, p99 at
    /// one rate, CPU per message, memory per idle connection, and the
    /// offline path (stored, then fetched at login).
    Prosody {
        #[command(flatten)]
        args: DeliveryArgs,
        #[command(flatten)]
        xmpp: xmpp::XmppArgs,
    },
    /// The XMPP server ejabberd over direct TLS beside ours: the same
    /// measurements as `prosody`.
    Ejabberd {
        #[command(flatten)]
        args: DeliveryArgs,
        #[command(flatten)]
        xmpp: xmpp::XmppArgs,
    },
    /// The Matrix homeserver Synapse beside ours: room messages through
    /// the client-server API, received by `/sync` long polls; msgs/s, p99
    /// at one rate, CPU per message, memory per idle logged-in client.
    Synapse {
        #[command(flatten)]
        args: DeliveryArgs,
        #[command(flatten)]
        synapse: synapse::SynapseArgs,
    },
    /// The operator endpoint's cost: throughput with `--metrics-listen`
    /// scraped throughout, beside the same server without it.
    Metrics {
        #[command(flatten)]
        args: DeliveryArgs,
        #[command(flatten)]
        metrics: metrics::MetricsArgs,
    },
    /// throughput, latency at 50% of the measured maximum, p2p, fanout,
    /// coldstart, idle-memory, metrics, ngircd, prosody, ejabberd and
    /// synapse (each skipped when not installed), postgres (skipped when
    /// PostgreSQL is not installed).
    All(Box<AllArgs>),
    /// Writes the results table of the benchmarks page from report lines.
    Table(TableArgs),
    /// The raw quinn relay peer (started by the scenarios).
    #[command(hide = true)]
    RelayServe {
        /// Seconds before it exits on its own.
        #[arg(long, default_value_t = 900)]
        max_secs: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    quicnprotochat_client::harness::install_crypto_provider();
    if let Cmd::Table(a) = &cli.command {
        return table::run(a);
    }
    if let Cmd::RelayServe { max_secs } = cli.command {
        // The relay runs on one thread, like the server's RPC loop.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return rt.block_on(relay::serve(Duration::from_secs(max_secs)));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // On SIGINT or SIGTERM the scenario is dropped, which stops its server
    // processes and its PostgreSQL cluster and removes their directories.
    rt.block_on(async {
        tokio::select! {
            r = run(cli) => r,
            r = interrupted() => r,
        }
    })
}

/// Waits for SIGINT or SIGTERM, then fails.
async fn interrupted() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let name = tokio::select! {
        r = tokio::signal::ctrl_c() => { r?; "SIGINT" }
        _ = term.recv() => "SIGTERM",
    };
    anyhow::bail!("interrupted by {name}: servers and databases stopped")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let g = cli.global;
    let core = g.core();
    match cli.command {
        Cmd::Throughput(a) => {
            let bin = common::server_bin(g.server_bin.as_deref())?;
            delivery::throughput(&bin, core, &a).await?.emit();
        }
        Cmd::Latency {
            args,
            rate,
            fraction,
        } => {
            let bin = common::server_bin(g.server_bin.as_deref())?;
            let rate = match rate {
                Some(r) => r,
                None => {
                    let t = delivery::throughput(&bin, core, &args).await?;
                    t.emit();
                    max_rate(&t)? * fraction
                }
            };
            delivery::latency(&bin, core, &args, rate).await?.emit();
        }
        Cmd::P2p(a) => {
            let bin = common::server_bin(g.server_bin.as_deref())?;
            p2p::run(&bin, core, &a).await?.emit();
        }
        Cmd::Fanout(a) => {
            let bin = common::server_bin(g.server_bin.as_deref())?;
            fanout::run(&bin, core, &a).await?.emit();
        }
        Cmd::All(all) => {
            let AllArgs {
                args,
                p2p: pa,
                fanout: fa,
                cold,
                idle,
                pg,
                metrics: ma,
                irc: ia,
                xmpp: xa,
                synapse: sa,
                no_chat_peers,
                no_postgres,
            } = *all;
            let bin = common::server_bin(g.server_bin.as_deref())?;
            let t = delivery::throughput(&bin, core, &args).await?;
            t.emit();
            let rate = max_rate(&t)? * 0.5;
            delivery::latency(&bin, core, &args, rate).await?.emit();
            p2p::run(&bin, core, &pa).await?.emit();
            fanout::run(&bin, core, &fa).await?.emit();
            startup::coldstart(&bin, core, &cold).await?.emit();
            startup::idle_memory(&bin, core, &idle).await?.emit();
            metrics::run(&bin, core, &args, &ma).await?.emit();
            if !no_chat_peers {
                match irc::run(&bin, core, &args, &ia).await {
                    Ok(r) => {
                        r.emit();
                    }
                    Err(e) if irc::not_installed(&e) => eprintln!("ngircd: skipped: {e:#}"),
                    Err(e) => return Err(e),
                }
                for (kind, name) in [
                    (xmpp::Kind::Prosody, "prosody"),
                    (xmpp::Kind::Ejabberd, "ejabberd"),
                ] {
                    match xmpp::run(&bin, core, &args, &xa, kind).await {
                        Ok(r) => {
                            r.emit();
                        }
                        Err(e) if xmpp::not_installed(&e) => eprintln!("{name}: skipped: {e:#}"),
                        Err(e) => return Err(e),
                    }
                }
                match synapse::run(&bin, core, &args, &sa).await {
                    Ok(r) => {
                        r.emit();
                    }
                    Err(e) if synapse::not_installed(&e) => eprintln!("synapse: skipped: {e:#}"),
                    Err(e) => return Err(e),
                }
            }
            if !no_postgres {
                match postgres::run(&bin, core, &args, &pg).await {
                    Ok((p, push)) => {
                        p.emit();
                        push.emit();
                    }
                    Err(e) if postgres::not_installed(&e) => {
                        eprintln!("postgres: skipped: {e:#}");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Cmd::Postgres { args, pg } => {
            let bin = common::server_bin(g.server_bin.as_deref())?;
            let (p, push) = postgres::run(&bin, core, &args, &pg).await?;
            p.emit();
            push.emit();
        }
        Cmd::Ngircd { args, irc } => {
            let bin = common::server_bin(g.server_bin.as_deref())?;
            irc::run(&bin, core, &args, &irc).await?.emit();
        }
        Cmd::Prosody { args, xmpp } => {
            let bin = common::server_bin(g.server_bin.as_deref())?;
            xmpp::run(&bin, core, &args, &xmpp, xmpp::Kind::Prosody)
                .await?
                .emit();
        }
        Cmd::Ejabberd { args, xmpp } => {
            let bin = common::server_bin(g.server_bin.as_deref())?;
            xmpp::run(&bin, core, &args, &xmpp, xmpp::Kind::Ejabberd)
                .await?
                .emit();
        }
        Cmd::Synapse { args, synapse } => {
            let bin = common::server_bin(g.server_bin.as_deref())?;
            synapse::run(&bin, core, &args, &synapse).await?.emit();
        }
        Cmd::Connections(a) => {
            let bin = common::server_bin(g.server_bin.as_deref())?;
            connections::run(&bin, core, &a).await?.emit();
        }
        Cmd::Metrics { args, metrics } => {
            let bin = common::server_bin(g.server_bin.as_deref())?;
            metrics::run(&bin, core, &args, &metrics).await?.emit();
        }
        Cmd::Coldstart(a) => {
            let bin = common::server_bin(g.server_bin.as_deref())?;
            startup::coldstart(&bin, core, &a).await?.emit();
        }
        Cmd::IdleMemory(a) => {
            let bin = common::server_bin(g.server_bin.as_deref())?;
            startup::idle_memory(&bin, core, &a).await?.emit();
        }
        Cmd::Backup(a) => {
            let bin = common::server_bin(g.server_bin.as_deref())?;
            backup::run(&bin, core, &a).await?.emit();
        }
        Cmd::RelayServe { .. } | Cmd::Table(_) => {}
    }
    Ok(())
}

fn max_rate(t: &Report) -> anyhow::Result<f64> {
    t.figures
        .get("delivered_per_sec")
        .and_then(serde_json::Value::as_f64)
        .filter(|r| *r > 0.0)
        .ok_or_else(|| anyhow::anyhow!("no maximum rate measured"))
}
