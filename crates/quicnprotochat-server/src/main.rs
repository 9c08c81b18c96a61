//! `quicnprotochat-server`: run the delivery service, or probe one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use quicnprotochat_proto::rustls::pki_types::CertificateDer;
use quicnprotochat_proto::rustls::pki_types::pem::PemObject as _;
use quicnprotochat_proto::transport;
use quicnprotochat_server::config::{
    AdminArgs, AdminCommand, BackupArgs, Cli, Command, Config, HealthArgs, LogFormat, RekeyArgs,
    RestoreArgs, ServerArgs,
};
use quicnprotochat_server::server::{DEV_CERT_FILE, TokenReloader};
use quicnprotochat_server::{Server, health, maintenance};

fn main() -> ExitCode {
    transport::install_default_provider();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    // The server options are global: clap gathers them from before and after
    // the subcommand into `cli.options`.
    let result = match cli.command {
        None | Some(Command::Serve) => serve(&cli.options),
        Some(Command::Health(h)) => health_check(&cli.options, &h),
        Some(Command::Backup(b)) => backup(&cli.options, &b),
        Some(Command::Restore(r)) => restore(&cli.options, &r),
        Some(Command::Rekey(r)) => rekey(&cli.options, &r),
        Some(Command::Admin(a)) => admin(&cli.options, &a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: a cause whose
/// text an outer error already shows is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let lines = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => lines
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => lines.json().with_ansi(false).init(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

fn serve(args: &ServerArgs) -> anyhow::Result<ExitCode> {
    let config = Config::resolve(args)?;
    let rt = runtime()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        // Listening before the server is: a SIGHUP sent once it reports
        // that it listens never meets the default action (exit).
        let hangups = hangup_signals();
        let server = Server::bind(&config).await?;
        let reloads = tokio::task::spawn_local(reload_tokens_on_hangup(
            hangups,
            args.clone(),
            server.token_reloader(),
        ));
        server.serve(shutdown_signal()).await;
        reloads.abort();
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = Option<()>;

fn hangup_signals() -> Hangups {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; access tokens reload only by a restart");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// On each SIGHUP: reads the configuration (file and token file) again and
/// accepts exactly the access tokens it names; a configuration that fails
/// keeps the tokens in use.  Other settings take effect at the next start.
async fn reload_tokens_on_hangup(hangups: Hangups, args: ServerArgs, reloader: TokenReloader) {
    #[cfg(unix)]
    if let Some(mut hangups) = hangups {
        while hangups.recv().await.is_some() {
            let reloaded = Config::resolve(&args)
                .map_err(quicnprotochat_server::ServerError::from)
                .and_then(|config| reloader.reload(&config));
            match reloaded {
                Ok(tokens) => tracing::info!(tokens, "SIGHUP: access tokens reloaded"),
                Err(e) => tracing::error!(
                    error = %e,
                    "SIGHUP: reload failed; the access tokens in use are kept"
                ),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (hangups, args, reloader);
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn health_check(args: &ServerArgs, h: &HealthArgs) -> anyhow::Result<ExitCode> {
    let config = Config::resolve(args)?;
    let cert_path = match &config.tls_paths {
        Some((cert, _)) => cert.clone(),
        None => config.data_dir.join(DEV_CERT_FILE),
    };
    let cert = CertificateDer::from_pem_file(&cert_path)
        .with_context(|| format!("reading the server certificate {}", cert_path.display()))?;
    let fingerprint = transport::fingerprint(&cert);
    let addr = h.addr.unwrap_or_else(|| loopback_for(config.listen));
    let rt = runtime()?;
    let local = tokio::task::LocalSet::new();
    let report = local.block_on(
        &rt,
        health::probe(addr, fingerprint, Duration::from_secs(h.timeout_secs)),
    );
    match report {
        Ok(r) if r.ok => {
            println!(
                "ok: server {} wire {} store reachable",
                r.server_version, r.wire_version
            );
            Ok(ExitCode::SUCCESS)
        }
        Ok(r) => {
            println!(
                "unhealthy: server {} store reachable: {}",
                r.server_version, r.store_reachable
            );
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            println!("unhealthy: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn backup(args: &ServerArgs, b: &BackupArgs) -> anyhow::Result<ExitCode> {
    let config = Config::resolve(args)?;
    maintenance::backup(&config, &b.to)
        .with_context(|| format!("writing the backup {}", b.to.display()))?;
    println!("backup written to {}", b.to.display());
    Ok(ExitCode::SUCCESS)
}

fn restore(args: &ServerArgs, r: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let config = Config::resolve(args)?;
    let restored = maintenance::restore(&config, &r.from)
        .with_context(|| format!("restoring the backup {}", r.from.display()))?;
    println!(
        "restored {}: new store incarnation {}",
        r.from.display(),
        hex::encode(restored.incarnation)
    );
    if let Some(old) = restored.replaced {
        println!("the replaced database is kept as {}", old.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn rekey(args: &ServerArgs, r: &RekeyArgs) -> anyhow::Result<ExitCode> {
    let config = Config::resolve(args)?;
    let new = maintenance::read_key_file(&r.new_key_file, "new_key_file")?;
    let done = maintenance::rekey(&config, &new).context("re-keying the database")?;
    let rows = |table: &str| {
        done.counts
            .iter()
            .find(|(t, _)| t == table)
            .map_or(0, |(_, n)| *n)
    };
    println!(
        "re-keyed the database ({} queued messages, {} users): it opens only under the new key \
         now; set db_key to it before starting the server",
        rows("queue"),
        rows("users")
    );
    Ok(ExitCode::SUCCESS)
}

fn admin(args: &ServerArgs, a: &AdminArgs) -> anyhow::Result<ExitCode> {
    use quicnprotochat_server::admin;
    let config = Config::resolve(args)?;
    let rt = runtime()?;
    let out = rt.block_on(async {
        let opened = admin::AdminStore::open(&config)
            .await
            .context("opening the store")?;
        let store = opened.store();
        let now_ms = config.clock.unix_ms();
        let now_secs = now_ms / 1000;
        anyhow::Ok(match &a.command {
            AdminCommand::Stats => {
                let stats = store.stats(now_secs).await?;
                if a.json {
                    admin::stats_json(&stats)?
                } else {
                    admin::stats_table(&stats)
                }
            }
            AdminCommand::Queues { limit } => {
                let rows = admin::queue_rows(&store.largest_queues(*limit).await?, now_ms);
                if a.json {
                    admin::queues_json(&rows)?
                } else {
                    admin::queues_table(&rows)
                }
            }
            AdminCommand::KeyPackages { limit } => {
                let rows = admin::stock_rows(&store.key_package_stock(now_secs, *limit).await?);
                if a.json {
                    admin::stock_json(&rows)?
                } else {
                    admin::stock_table(&rows)
                }
            }
            AdminCommand::Unregister { username } => {
                let Some(done) = store.unregister(username.clone()).await? else {
                    anyhow::bail!("no user is registered as {username:?}");
                };
                let report = admin::unregister_report(username, &done);
                if a.json {
                    admin::unregister_json(&report)?
                } else {
                    admin::unregister_text(&report)
                }
            }
        })
    })?;
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

fn loopback_for(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    };
    SocketAddr::new(ip, listen.port())
}
