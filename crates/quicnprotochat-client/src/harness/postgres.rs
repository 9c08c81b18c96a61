//! A real PostgreSQL for tests, started by the tests themselves.
//!
//! [`PgCluster::shared`] is the database server every test of one process
//! shares: the one `QUICNPROTOCHAT_TEST_DATABASE_URL` names when it is set,
//! otherwise a private cluster this process starts once (`initdb` and
//! `pg_ctl` of the installed PostgreSQL, in a temporary directory, reachable
//! only through a Unix socket in that directory).  PostgreSQL refuses to run
//! as root, so when the tests run as root the cluster runs as the
//! unprivileged `postgres` system user.  A watchdog stops the cluster and
//! removes its directory once the test process has exited, however it
//! exits.  Each test takes a database of its own ([`PgCluster::database`]),
//! dropped when the test ends.
//!
//! [`PgCluster::start`] starts a cluster of the caller's own, for tests that
//! stop and start the database server itself.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Set to a connection string (URL or `key=value` pairs) of a PostgreSQL
/// server whose user may create databases, to run the tests against it
/// instead of a private cluster.
pub const TEST_DATABASE_URL_ENV: &str = "QUICNPROTOCHAT_TEST_DATABASE_URL";

/// The port that names the cluster's socket file (nothing listens on TCP).
const PORT: u16 = 5432;

/// Failures starting or using the test database server.
#[derive(Debug, thiserror::Error)]
pub enum PgClusterError {
    /// the PostgreSQL server binaries are not installed
    #[error(
        "no PostgreSQL server binaries (initdb, pg_ctl) found: install the `postgresql` package (scripts/bootstrap does), set QUICNPROTOCHAT_PG_BINDIR, or set {TEST_DATABASE_URL_ENV}"
    )]
    NotInstalled,
    /// a command failed
    #[error("{what}: {detail}")]
    Command {
        /// the command
        what: String,
        /// its output
        detail: String,
    },
    /// an IO error
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// a PostgreSQL error
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// the shared cluster failed to start earlier in this process
    #[error("the shared test cluster did not start: {0}")]
    SharedFailed(String),
}

/// A PostgreSQL server for tests.
#[derive(Debug)]
pub struct PgCluster {
    /// admin connection string (a database to connect to for CREATE DATABASE)
    admin: String,
    /// the private cluster, if this process started it
    private: Option<Private>,
    /// the loopback TCP port, for a cluster that also listens on TCP
    tcp_port: Option<u16>,
}

/// A server certificate and key (PEM) for a cluster that takes TLS
/// connections.
#[derive(Debug, Clone)]
pub struct PgTls {
    /// certificate chain, PEM
    pub cert_pem: String,
    /// private key, PEM
    pub key_pem: String,
}

#[derive(Debug)]
struct Private {
    dir: PathBuf,
    bindir: PathBuf,
    run_as: Option<String>,
    /// removed on drop (owned clusters); `None` for the shared one, which
    /// its watchdog removes
    temp: Option<tempfile::TempDir>,
}

static SHARED: OnceLock<Result<PgCluster, String>> = OnceLock::new();
static NEXT_DB: AtomicU64 = AtomicU64::new(0);

impl PgCluster {
    /// The database server this process's tests share (see the module
    /// documentation); started on first use.
    pub fn shared() -> Result<&'static PgCluster, PgClusterError> {
        SHARED
            .get_or_init(|| {
                if let Ok(url) = std::env::var(TEST_DATABASE_URL_ENV)
                    && !url.trim().is_empty()
                {
                    return Ok(PgCluster {
                        admin: url,
                        private: None,
                        tcp_port: None,
                    });
                }
                Self::start_private(Lifetime::Process, Durability::Fast, None)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| PgClusterError::SharedFailed(e.clone()))
    }

    /// A private cluster of the caller's own (stopped and removed on drop),
    /// with fsync off: fast, and durable across stops, starts and a killed
    /// server process, not across a crash of the machine.
    pub fn start() -> Result<PgCluster, PgClusterError> {
        Self::start_private(Lifetime::Owned, Durability::Fast, None)
    }

    /// Like [`PgCluster::start`], also listening on a loopback TCP port
    /// ([`PgCluster::tcp_port`]) that takes TLS connections with `tls`.
    pub fn start_tls(tls: &PgTls) -> Result<PgCluster, PgClusterError> {
        Self::start_private(Lifetime::Owned, Durability::Fast, Some(tls))
    }

    /// The loopback TCP port of a cluster started with
    /// [`PgCluster::start_tls`].
    pub fn tcp_port(&self) -> Option<u16> {
        self.tcp_port
    }

    /// Like [`PgCluster::start`], with every commit flushed to disk
    /// (`fsync = on`, `synchronous_commit = on`): for benchmarks.
    pub fn start_durable() -> Result<PgCluster, PgClusterError> {
        Self::start_private(Lifetime::Owned, Durability::Durable, None)
    }

    fn start_private(
        lifetime: Lifetime,
        durability: Durability,
        tls: Option<&PgTls>,
    ) -> Result<Self, PgClusterError> {
        let bindir = bindir().ok_or(PgClusterError::NotInstalled)?;
        let temp = tempfile::Builder::new().prefix("qnpc-pg-").tempdir()?;
        let dir = temp.path().to_path_buf();
        let run_as = running_as_root()?.then(|| "postgres".to_string());
        let owner = run_as.as_deref().map(user_ids).transpose()?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        let private = Private {
            dir: dir.clone(),
            bindir,
            run_as,
            temp: match lifetime {
                Lifetime::Owned => Some(temp),
                Lifetime::Process => {
                    // The watchdog removes it after the process exits.
                    let _kept = temp.keep();
                    None
                }
            },
        };
        let data = dir.join("data");
        private.run(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
        )?;
        let fsync = match durability {
            Durability::Fast => "fsync = off\nfull_page_writes = off\n",
            Durability::Durable => "fsync = on\nfull_page_writes = on\n",
        };
        let (listen, port, ssl) = match tls {
            None => (String::new(), PORT, String::new()),
            Some(tls) => {
                // Files the server reads: owned by its user, the key 0600
                // (PostgreSQL refuses a key others may read).
                for (name, pem) in [("server.crt", &tls.cert_pem), ("server.key", &tls.key_pem)] {
                    let path = data.join(name);
                    std::fs::write(&path, pem)?;
                    std::fs::set_permissions(
                        &path,
                        std::os::unix::fs::PermissionsExt::from_mode(0o600),
                    )?;
                    if let Some((uid, gid)) = owner {
                        std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
                    }
                }
                let port = std::net::TcpListener::bind(("127.0.0.1", 0))?
                    .local_addr()?
                    .port();
                (
                    "127.0.0.1".to_string(),
                    port,
                    "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
                        .to_string(),
                )
            }
        };
        let settings = format!(
            "\n# test cluster\nlisten_addresses = '{listen}'\nunix_socket_directories = '{}'\nport = {port}\nmax_connections = 300\nshared_buffers = 64MB\nsynchronous_commit = on\n{fsync}{ssl}",
            dir.display()
        );
        // initdb made the file as the cluster's user; appending as root keeps
        // its owner.
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?;
        std::io::Write::write_all(&mut conf, settings.as_bytes())?;
        if lifetime == Lifetime::Process {
            private.watch(std::process::id())?;
        }
        let cluster = PgCluster {
            admin: format!(
                "host={} port={port} user=postgres dbname=postgres",
                dir.display()
            ),
            private: Some(private),
            tcp_port: tls.map(|_| port),
        };
        cluster.start_server()?;
        Ok(cluster)
    }

    /// Starts the (stopped) private cluster's server again; waits until it
    /// accepts connections.
    pub fn start_server(&self) -> Result<(), PgClusterError> {
        let p = self.private()?;
        let data = p.dir.join("data");
        let log = p.dir.join("server.log");
        p.run(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .map(|_| ())
    }

    /// Stops the private cluster's server: `fast` (clients disconnected,
    /// a clean shutdown) or, with `immediate`, as a crash would.
    pub fn stop_server(&self, immediate: bool) -> Result<(), PgClusterError> {
        let p = self.private()?;
        let data = p.dir.join("data");
        let mode = if immediate { "immediate" } else { "fast" };
        p.run(
            "pg_ctl",
            &["-D", &data.to_string_lossy(), "-m", mode, "-w", "stop"],
        )
        .map(|_| ())
    }

    fn private(&self) -> Result<&Private, PgClusterError> {
        self.private.as_ref().ok_or_else(|| PgClusterError::Command {
            what: "pg_ctl".into(),
            detail: format!("the cluster named by {TEST_DATABASE_URL_ENV} is not the tests' to stop or start"),
        })
    }

    /// A connection string for database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        with_dbname(&self.admin, name)
    }

    /// A fresh, empty database of the caller's own (dropped on drop).
    pub async fn database(&self) -> Result<TestDatabase, PgClusterError> {
        let name = format!(
            "qnpc_test_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let (client, connection) =
            tokio_postgres::connect(&self.admin, tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        drop(client);
        let _ = conn.await;
        Ok(TestDatabase {
            url: self.url(&name),
            admin: self.admin.clone(),
            name,
        })
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.private.as_ref().is_some_and(|p| p.temp.is_some())
            && let Err(e) = self.stop_server(true)
        {
            tracing::warn!(error = %e, "stopping the test cluster");
        }
    }
}

impl Private {
    /// Runs a PostgreSQL binary as the cluster's user.
    fn run(&self, program: &str, args: &[&str]) -> Result<String, PgClusterError> {
        let path = self.bindir.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        let out = cmd
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(PgClusterError::Command {
                what: format!("{program} {}", args.join(" ")),
                detail: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts a watchdog that stops the cluster and removes its directory
    /// once process `pid` has exited.
    fn watch(&self, pid: u32) -> Result<(), PgClusterError> {
        let script = r#"while [ -d "/proc/$1" ]; do sleep 1; done
"$2/pg_ctl" -D "$3/data" -m immediate stop >/dev/null 2>&1
rm -rf "$3""#;
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--", "sh"]);
                c
            }
            None => Command::new("sh"),
        };
        cmd.arg("-c")
            .arg(script)
            .arg("sh")
            .arg(pid.to_string())
            .arg(&self.bindir)
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(())
    }
}

/// A database of one test, dropped (with its connections) on drop.
#[derive(Debug)]
pub struct TestDatabase {
    /// its connection string
    pub url: String,
    name: String,
    admin: String,
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop runs inside the test's runtime: drop the database from a
        // thread with a runtime of its own.
        let dropped = std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                let conn = tokio::spawn(connection);
                let r = tokio::time::timeout(Duration::from_secs(20), client.batch_execute(&sql))
                    .await
                    .map_err(|_| "timed out".to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()));
                drop(client);
                let _ = conn.await;
                r
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, database = %self.name, "dropping a test database")
            }
            Err(_) => tracing::warn!(database = %self.name, "dropping a test database panicked"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifetime {
    /// stopped and removed when the process exits
    Process,
    /// stopped and removed on drop
    Owned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    Fast,
    Durable,
}

/// `conn` with its database set to `name` (a later `dbname` overrides an
/// earlier one, in URLs and in `key=value` strings alike).
fn with_dbname(conn: &str, name: &str) -> String {
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        let sep = if conn.contains('?') { '&' } else { '?' };
        format!("{conn}{sep}dbname={name}")
    } else {
        format!("{conn} dbname={name}")
    }
}

/// The directory of `initdb` and `pg_ctl`: `QUICNPROTOCHAT_PG_BINDIR`, then
/// `pg_config --bindir`, then the newest `/usr/lib/postgresql/*/bin`.
fn bindir() -> Option<PathBuf> {
    let has_initdb = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(d) = std::env::var_os("QUICNPROTOCHAT_PG_BINDIR").map(PathBuf::from) {
        return has_initdb(&d).then_some(d);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_initdb(&d) {
            return Some(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has_initdb(d))
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}

fn running_as_root() -> Result<bool, PgClusterError> {
    Ok(std::fs::metadata("/proc/self")?.uid() == 0)
}

/// The uid and gid of `user` (from `id`).
fn user_ids(user: &str) -> Result<(u32, u32), PgClusterError> {
    let id = |flag: &str| -> Result<u32, PgClusterError> {
        let out = Command::new("id").args([flag, user]).output()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| PgClusterError::Command {
                what: format!("id {flag} {user}"),
                detail: format!(
                    "no such user: PostgreSQL refuses to run as root, and the tests run it as `{user}` (the postgresql package creates it){}",
                    String::from_utf8_lossy(&out.stderr)
                ),
            })
    };
    Ok((id("-u")?, id("-g")?))
}
