//! Server configuration in two layers.
//!
//! [`Cli`] (flags and `QUICNPROTOCHAT_*` environment variables, through clap)
//! and [`FileConfig`] (an optional TOML file) are the raw layer; flags and
//! environment win over the file, the file over the built-in defaults.
//! [`Config::resolve`] turns them into one validated [`Config`].  Every
//! default is a named constant with the reason for its value.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use quicnprotochat_core::clock::SharedClock;
use serde::Deserialize;

use crate::store::sqlite::Synchronous;

/// Default listen address: loopback, so a development server is never exposed
/// by accident.  Operators set `0.0.0.0:4433` (the Docker image does).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4433";

/// Default data directory (relative to the working directory).
pub const DEFAULT_DATA_DIR: &str = "data";

/// The development access token, accepted only in development mode, where its
/// use is logged as a warning at start-up.
pub const DEV_AUTH_TOKEN: &str = "devtoken";

/// Queue depth cap per recipient.  A member of 50 busy groups offline for a
/// day stays well below it; nothing is ever dropped: past it enqueue fails
/// with `queueFull`.
pub const DEFAULT_QUEUE_DEPTH: u64 = 10_000;

/// Messages from strangers (senders without the recipient's delivery
/// token) one queue holds besides `queue_depth`: room for Welcomes and first
/// messages, small enough that strangers cannot fill a queue.
pub const DEFAULT_STRANGER_QUEUE_DEPTH: u64 = 1_000;

/// Messages one stranger may have waiting in one queue: a Welcome and a
/// few first messages, so that one flooder holds only a sliver of the
/// stranger lane.
pub const DEFAULT_STRANGER_MESSAGES_PER_SENDER: u64 = 20;

/// Most one-time key packages one identity may keep on the server (XMTP and
/// Wire keep on the order of 100; 1000 leaves room for bursts of invites).
pub const DEFAULT_MAX_KEY_PACKAGES_PER_IDENTITY: u32 = 1_000;

/// Connections overall.  An idle connection holds quinn buffers, TLS state
/// and RPC tables; the benchmark suite measures what that costs (memory per
/// idle authenticated connection on the benchmarks page) to size this cap.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4_096;

/// Connections from one IP address: enough for a household or office behind
/// one NAT, small enough that one host cannot take the whole budget.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 64;

/// Time from the QUIC handshake to a successful `authenticate`.  An honest
/// client needs two round trips; 10 s covers slow mobile links.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(10);

/// QUIC idle timeout.  Clients send keep-alives every 15 s (quinn's guidance
/// is to keep alive at less than half the idle timeout).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Deadline for each store operation behind a request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest value of each `*_timeout_secs` limit: one day, far above any
/// useful timeout (the defaults are seconds to a minute) and far below the
/// values whose deadline (now + timeout) overflows the clock.
pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;

/// How long a stopping server (SIGTERM, SIGINT) lets the calls in flight
/// run to their answer before it closes the connections still busy.  Calls
/// take milliseconds; 5 s covers a slow commit, and with the 3 s the server
/// then allows for the close to reach clients it stays inside the 10 s
/// `docker stop` waits before SIGKILL (Kubernetes waits 30 s).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a (sender, message id) pair is remembered to drop retries: one
/// week, longer than any client's retry horizon.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// Database connections each server node keeps at most when the store is
/// PostgreSQL: enough for the RPC thread's concurrent calls (each holds one
/// for a few milliseconds), few enough that ten nodes stay inside
/// PostgreSQL's default `max_connections` of 100 with room for operators.
pub const DEFAULT_DATABASE_POOL_SIZE: usize = 8;

/// QUIC connection-level receive window: bounds what one peer can make us
/// buffer (quinn's default is unbounded).  4 MiB still fills a 100 Mbit/s,
/// 300 ms path.
pub const DEFAULT_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// Server operating mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Development shortcuts allowed, each logged as a warning.
    #[default]
    Development,
    /// No shortcuts: the server refuses to start without real secrets.
    Production,
}

/// A token-bucket rate: `per_second` refill, `burst` capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Rate {
    /// sustained requests per second
    pub per_second: u32,
    /// bucket size
    pub burst: u32,
}

/// Rate limits.  Defaults are chosen so an honest client never meets them and
/// one abusive client cannot starve the server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    /// Login attempts per remote IP, charged at `challenge` (each allows one
    /// Ed25519 verification): 5/s, bursts of 20 for NAT'd offices.
    pub auth_per_ip: Rate,
    /// `authenticate` attempts per claimed identity key, from any address:
    /// stops a distributed guessing run against one identity (tokens are
    /// per deployment, so this mostly caps verification work): 2/s, bursts
    /// of 10 for a user reconnecting several devices.
    pub auth_per_identity: Rate,
    /// enqueues per identity: 100/s sustained, bursts of 500 (a burst of
    /// messages to a dozen groups).
    pub enqueue_per_identity: Rate,
    /// enqueues per remote IP, across identities.
    pub enqueue_per_ip: Rate,
    /// key-package fetches per identity: inviting 100 people at once, then
    /// 10/s (attack case: key-package exhaustion).
    pub key_package_fetch_per_identity: Rate,
    /// key-package fetches per remote IP.
    pub key_package_fetch_per_ip: Rate,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            auth_per_ip: Rate {
                per_second: 5,
                burst: 20,
            },
            auth_per_identity: Rate {
                per_second: 2,
                burst: 10,
            },
            enqueue_per_identity: Rate {
                per_second: 100,
                burst: 500,
            },
            enqueue_per_ip: Rate {
                per_second: 1_000,
                burst: 2_000,
            },
            key_package_fetch_per_identity: Rate {
                per_second: 10,
                burst: 100,
            },
            key_package_fetch_per_ip: Rate {
                per_second: 50,
                burst: 200,
            },
        }
    }
}

/// Limits with operator overrides (`[limits]` in the TOML file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// see [`DEFAULT_QUEUE_DEPTH`]
    pub queue_depth: u64,
    /// see [`DEFAULT_STRANGER_QUEUE_DEPTH`]
    pub stranger_queue_depth: u64,
    /// see [`DEFAULT_STRANGER_MESSAGES_PER_SENDER`]
    pub stranger_messages_per_sender: u64,
    /// largest payload, at most the protocol's 5 MiB
    pub max_payload_bytes: usize,
    /// see [`DEFAULT_MAX_KEY_PACKAGES_PER_IDENTITY`]
    pub max_key_packages_per_identity: u32,
    /// see [`DEFAULT_MAX_CONNECTIONS`]
    pub max_connections: usize,
    /// see [`DEFAULT_MAX_CONNECTIONS_PER_IP`]
    pub max_connections_per_ip: usize,
    /// seconds; see [`DEFAULT_AUTH_TIMEOUT`]
    pub auth_timeout_secs: u64,
    /// seconds; see [`DEFAULT_IDLE_TIMEOUT`]
    pub idle_timeout_secs: u64,
    /// seconds from a frame's first byte to its last
    pub frame_timeout_secs: u64,
    /// seconds; see [`DEFAULT_REQUEST_TIMEOUT`]
    pub request_timeout_secs: u64,
    /// seconds; see [`DEFAULT_DEDUP_WINDOW`]
    pub dedup_window_secs: u64,
    /// bytes; see [`DEFAULT_CONNECTION_WINDOW`]
    pub connection_window_bytes: u32,
    /// token buckets
    pub rates: RateLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            queue_depth: DEFAULT_QUEUE_DEPTH,
            stranger_queue_depth: DEFAULT_STRANGER_QUEUE_DEPTH,
            stranger_messages_per_sender: DEFAULT_STRANGER_MESSAGES_PER_SENDER,
            max_payload_bytes: quicnprotochat_proto::limits::MAX_PAYLOAD_BYTES,
            max_key_packages_per_identity: DEFAULT_MAX_KEY_PACKAGES_PER_IDENTITY,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            auth_timeout_secs: DEFAULT_AUTH_TIMEOUT.as_secs(),
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT.as_secs(),
            frame_timeout_secs: quicnprotochat_proto::rpc::DEFAULT_FRAME_TIMEOUT.as_secs(),
            request_timeout_secs: DEFAULT_REQUEST_TIMEOUT.as_secs(),
            dedup_window_secs: DEFAULT_DEDUP_WINDOW.as_secs(),
            connection_window_bytes: DEFAULT_CONNECTION_WINDOW,
            rates: RateLimits::default(),
        }
    }
}

/// The TOML configuration file.  Unknown keys are an error, so a typo never
/// silently leaves a default in place.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// operating mode
    pub mode: Option<Mode>,
    /// UDP listen address
    pub listen: Option<SocketAddr>,
    /// data directory
    pub data_dir: Option<PathBuf>,
    /// access token (prefer the environment variable)
    pub auth_token: Option<String>,
    /// further access tokens, all accepted (rotation: old and new overlap);
    /// reloaded on SIGHUP
    pub auth_tokens: Option<Vec<String>>,
    /// file of access tokens, one a line; reloaded on SIGHUP
    pub auth_token_file: Option<PathBuf>,
    /// 64 hex characters; empty disables encryption (development only)
    pub db_key: Option<String>,
    /// PEM certificate chain
    pub cert_path: Option<PathBuf>,
    /// PEM private key
    pub key_path: Option<PathBuf>,
    /// `full` or `normal`
    pub db_synchronous: Option<Synchronous>,
    /// PostgreSQL connection string; unset: the embedded store (prefer the
    /// environment variable: it may hold a password)
    pub database_url: Option<String>,
    /// most PostgreSQL connections of this node
    pub database_pool_size: Option<usize>,
    /// PEM file of the certificate authorities of the database server's
    /// certificate: TLS to PostgreSQL, verified
    pub database_ca: Option<PathBuf>,
    /// seconds; see [`DEFAULT_DRAIN_TIMEOUT`]
    pub drain_timeout_secs: Option<u64>,
    /// TCP address of the HTTP endpoint (`/metrics`, `/livez`, `/readyz`);
    /// unset: no endpoint
    pub metrics_listen: Option<SocketAddr>,
    /// allow `metrics_listen` on an address other than loopback in
    /// production
    pub metrics_public: Option<bool>,
    /// limits
    pub limits: Option<Limits>,
}

/// quicnprotochat delivery server.
#[derive(Debug, Parser)]
#[command(name = "quicnprotochat-server", version, about, long_about = None)]
pub struct Cli {
    /// What to run (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Server options (also accepted after `serve`).
    #[command(flatten)]
    pub options: ServerArgs,
    /// Log line format on standard error: `text`, or `json` (one JSON object
    /// per line, for log collectors).
    #[arg(
        long,
        env = "QUICNPROTOCHAT_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true
    )]
    pub log_format: LogFormat,
}

/// Format of the log lines on standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// `tracing`'s text lines (coloured on a terminal)
    #[default]
    Text,
    /// one JSON object per line: `timestamp`, `level`, `target`, `fields`
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default). The server options may stand before or
    /// after it (they are global).
    Serve,
    /// Probe a running server's health RPC; exit 0 when it is ready, 1 otherwise.
    Health(HealthArgs),
    /// Write a consistent copy of the database to a new file (safe while the
    /// server runs).
    Backup(BackupArgs),
    /// Replace the database with a backup and give it a new store
    /// incarnation; stop the server first.
    Restore(RestoreArgs),
    /// Re-encrypt the database under a new key (crash-safe); stop the server
    /// first. The current key is the configured db_key.
    Rekey(RekeyArgs),
    /// Show what the store holds (counts, queues, key-package stock) or free
    /// a username; works beside a running server.
    Admin(AdminArgs),
}

/// Arguments of `admin`.
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// What to show or do.
    #[command(subcommand)]
    pub command: AdminCommand,
    /// Machine-readable JSON on standard output instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The `admin` commands.
#[derive(Debug, Clone, Subcommand)]
pub enum AdminCommand {
    /// Totals: identities, usernames, queues, messages, payload bytes, key
    /// packages.
    Stats,
    /// The deepest queues: identity fingerprint, depth, age of the oldest
    /// message (never contents or ids).
    Queues {
        /// How many queues to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Key-package stock per identity, fewest one-time packages first, with
    /// whether a last-resort package is there.
    KeyPackages {
        /// How many identities to show.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Free a username: its binding and its identity's key packages are
    /// removed; its queue stays for its owner to read.
    Unregister {
        /// The username to free.
        username: String,
    },
}

/// Arguments of `backup`.
#[derive(Debug, Clone, Args)]
pub struct BackupArgs {
    /// The backup file to write (must not exist).
    #[arg(long)]
    pub to: PathBuf,
}

/// Arguments of `restore`.
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// The backup file to install (it is copied, not moved).
    #[arg(long)]
    pub from: PathBuf,
}

/// Arguments of `rekey`.
#[derive(Debug, Clone, Args)]
pub struct RekeyArgs {
    /// File holding the new key: 64 hex characters (surrounding whitespace
    /// ignored); `-` reads it from standard input. Never a value on the
    /// command line, where other users could read it.
    #[arg(long, env = "QUICNPROTOCHAT_NEW_DB_KEY_FILE")]
    pub new_key_file: PathBuf,
}

/// Flags and environment variables of `serve` (each also settable in the file).
#[derive(Debug, Clone, Default, Args)]
pub struct ServerArgs {
    /// TOML configuration file.
    #[arg(long, env = "QUICNPROTOCHAT_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Operating mode: `production` refuses every development shortcut.
    #[arg(long, env = "QUICNPROTOCHAT_MODE", value_enum, global = true)]
    pub mode: Option<Mode>,
    /// UDP address to listen on [default: 127.0.0.1:4433].
    #[arg(long, env = "QUICNPROTOCHAT_LISTEN", global = true)]
    pub listen: Option<SocketAddr>,
    /// Data directory: database, development certificate [default: ./data].
    #[arg(long, env = "QUICNPROTOCHAT_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Access token clients must present. Development mode falls back to a
    /// well-known development token (with a warning).
    #[arg(
        long,
        env = "QUICNPROTOCHAT_AUTH_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub auth_token: Option<String>,
    /// File of access tokens, one a line (blank lines and lines starting
    /// with `#` skipped), all accepted beside the others configured; read
    /// again on SIGHUP, so tokens rotate without a restart.
    #[arg(long, env = "QUICNPROTOCHAT_AUTH_TOKEN_FILE", global = true)]
    pub auth_token_file: Option<PathBuf>,
    /// Database key: 64 hex characters (a raw 256-bit SQLCipher key). Empty
    /// disables encryption (development only). Development mode without a key
    /// generates one into the data directory (with a warning).
    #[arg(
        long,
        env = "QUICNPROTOCHAT_DB_KEY",
        hide_env_values = true,
        global = true
    )]
    pub db_key: Option<String>,
    /// TLS certificate chain (PEM). Development mode without one generates a
    /// self-signed certificate into the data directory.
    #[arg(long, env = "QUICNPROTOCHAT_CERT", global = true)]
    pub cert_path: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "QUICNPROTOCHAT_KEY", global = true)]
    pub key_path: Option<PathBuf>,
    /// Seconds a stopping server (SIGTERM, SIGINT) lets calls in flight
    /// finish before it closes the connections still busy; 0 closes them at
    /// once [default: 5].
    #[arg(long, env = "QUICNPROTOCHAT_DRAIN_TIMEOUT_SECS", global = true)]
    pub drain_timeout_secs: Option<u64>,
    /// PostgreSQL connection string (`postgresql://user:password@host/db`
    /// or `host=/run/postgresql dbname=quicnprotochat`): store everything
    /// there instead of the embedded database, so several server nodes can
    /// share it. Never logged.
    #[arg(
        long,
        env = "QUICNPROTOCHAT_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    pub database_url: Option<String>,
    /// Most PostgreSQL connections this node opens [default: 8].
    #[arg(long, env = "QUICNPROTOCHAT_DATABASE_POOL_SIZE", global = true)]
    pub database_pool_size: Option<usize>,
    /// PEM file of the certificate authorities that sign the PostgreSQL
    /// server's certificate: every TCP connection to the database is then
    /// TLS, with its certificate chain and host name verified.
    #[arg(long, env = "QUICNPROTOCHAT_DATABASE_CA", global = true)]
    pub database_ca: Option<PathBuf>,
    /// TCP address of the operator's HTTP endpoint: Prometheus metrics at
    /// /metrics, liveness at /livez, readiness at /readyz [default: none,
    /// no endpoint]. It has no authentication: keep it on loopback or a
    /// private network.
    #[arg(long, env = "QUICNPROTOCHAT_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<SocketAddr>,
    /// Allow --metrics-listen on an address other than loopback in
    /// production mode (the endpoint then answers anyone who reaches it).
    #[arg(long, env = "QUICNPROTOCHAT_METRICS_PUBLIC", global = true)]
    pub metrics_public: bool,
}

/// Flags of `health`.
#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// Server address to probe [default: the configured listen address, with
    /// an unspecified IP replaced by loopback].
    #[arg(long)]
    pub addr: Option<SocketAddr>,
    /// Seconds to wait for an answer.
    #[arg(long, default_value_t = 5)]
    pub timeout_secs: u64,
}

/// Configuration errors: each names the setting at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// the file could not be read
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// file
        path: String,
        /// cause
        source: std::io::Error,
    },
    /// the file is not valid TOML for this schema
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// file
        path: String,
        /// parser message (never echoes secret values)
        message: String,
    },
    /// a setting has an invalid value
    #[error("invalid setting {setting}: {reason}")]
    Invalid {
        /// setting name
        setting: &'static str,
        /// why
        reason: String,
    },
}

/// How the database key was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbKeySetting {
    /// operator-supplied raw key (hex decoded)
    Provided(KeyBytes),
    /// not configured: development mode generates and keeps one in the data dir
    DevGenerated,
    /// explicitly empty: encryption off
    Disabled,
}

/// 32 key bytes with a redacting `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyBytes(pub [u8; 32]);

impl std::fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A secret string with a redacting `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The resolved, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// operating mode
    pub mode: Mode,
    /// UDP listen address
    pub listen: SocketAddr,
    /// data directory
    pub data_dir: PathBuf,
    /// access token; `None` means "not configured"
    pub auth_token: Option<Secret>,
    /// further access tokens from the file's `auth_tokens`
    pub auth_tokens: Vec<Secret>,
    /// file of access tokens, one a line, read at start and on SIGHUP
    pub auth_token_file: Option<PathBuf>,
    /// database key choice
    pub db_key: DbKeySetting,
    /// certificate and key paths, when configured
    pub tls_paths: Option<(PathBuf, PathBuf)>,
    /// commit durability
    pub db_synchronous: Synchronous,
    /// PostgreSQL connection string: the store is PostgreSQL when set, the
    /// embedded SQLCipher database in `data_dir` when not
    pub database_url: Option<Secret>,
    /// most PostgreSQL connections of this node
    pub database_pool_size: usize,
    /// certificate authorities of the database server (TLS to PostgreSQL)
    pub database_ca: Option<PathBuf>,
    /// how long a stopping server lets calls in flight finish
    pub drain_timeout: Duration,
    /// address of the HTTP endpoint (metrics and probes), if any
    pub metrics_listen: Option<SocketAddr>,
    /// the operator allows the endpoint on a non-loopback address
    pub metrics_public: bool,
    /// limits
    pub limits: Limits,
    /// the clock the server tells time by (the system clock; tests set a
    /// manual one)
    pub clock: SharedClock,
}

impl Config {
    /// Development defaults rooted at `data_dir` (used by tests and tools).
    pub fn development(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            mode: Mode::Development,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.into(),
            auth_token: None,
            auth_tokens: Vec::new(),
            auth_token_file: None,
            db_key: DbKeySetting::DevGenerated,
            tls_paths: None,
            db_synchronous: Synchronous::Full,
            database_url: None,
            database_pool_size: DEFAULT_DATABASE_POOL_SIZE,
            database_ca: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            metrics_listen: None,
            metrics_public: false,
            limits: Limits::default(),
            clock: quicnprotochat_core::clock::system(),
        }
    }

    /// Merges flags/environment over the file over the defaults.
    pub fn resolve(args: &ServerArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    /// Parses and validates the text of a configuration file as
    /// [`Config::resolve`] does when no flag or environment variable is set.
    /// Errors name the file `<string>`.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::merge(&ServerArgs::default(), parse_file(text, "<string>")?)
    }

    /// Flags/environment over `file` over the defaults, validated.
    fn merge(args: &ServerArgs, file: FileConfig) -> Result<Self, ConfigError> {
        let listen = match args.listen.or(file.listen) {
            Some(a) => a,
            None => DEFAULT_LISTEN
                .parse()
                .map_err(|e: std::net::AddrParseError| ConfigError::Invalid {
                    setting: "listen",
                    reason: e.to_string(),
                })?,
        };
        let db_key = match args.db_key.clone().or(file.db_key) {
            None => DbKeySetting::DevGenerated,
            Some(s) if s.is_empty() => DbKeySetting::Disabled,
            Some(s) => DbKeySetting::Provided(parse_db_key(&s)?),
        };
        let cert = args.cert_path.clone().or(file.cert_path);
        let key = args.key_path.clone().or(file.key_path);
        let tls_paths = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::Invalid {
                    setting: "key_path",
                    reason: "cert_path is set but key_path is not".into(),
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    setting: "cert_path",
                    reason: "key_path is set but cert_path is not".into(),
                });
            }
        };
        let limits = file.limits.unwrap_or_default();
        validate_limits(&limits)?;
        let drain_timeout_secs = args
            .drain_timeout_secs
            .or(file.drain_timeout_secs)
            .unwrap_or(DEFAULT_DRAIN_TIMEOUT.as_secs());
        if drain_timeout_secs > MAX_TIMEOUT_SECS {
            return Err(ConfigError::Invalid {
                setting: "drain_timeout_secs",
                reason: "must be between 0 and 86400 (one day)".into(),
            });
        }
        let database_url = args
            .database_url
            .clone()
            .or(file.database_url)
            .filter(|u| !u.trim().is_empty());
        let database_ca = args.database_ca.clone().or(file.database_ca);
        if database_ca.is_some() && database_url.is_none() {
            return Err(ConfigError::Invalid {
                setting: "database_ca",
                reason: "is set but database_url is not (it is for TLS to PostgreSQL)".into(),
            });
        }
        if let Some(url) = &database_url {
            let mut options = crate::store::postgres::PgOptions::new(url.clone());
            options.ca_file = database_ca.clone();
            options.parse().map_err(|e| ConfigError::Invalid {
                setting: "database_url",
                reason: e.to_string(),
            })?;
        }
        let database_pool_size = args
            .database_pool_size
            .or(file.database_pool_size)
            .unwrap_or(DEFAULT_DATABASE_POOL_SIZE);
        if !(1..=1000).contains(&database_pool_size) {
            return Err(ConfigError::Invalid {
                setting: "database_pool_size",
                reason: "must be between 1 and 1000".into(),
            });
        }
        Ok(Self {
            mode: args.mode.or(file.mode).unwrap_or_default(),
            listen,
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            auth_token: args.auth_token.clone().or(file.auth_token).map(Secret),
            auth_tokens: file
                .auth_tokens
                .unwrap_or_default()
                .into_iter()
                .map(Secret)
                .collect(),
            auth_token_file: args.auth_token_file.clone().or(file.auth_token_file),
            db_key,
            tls_paths,
            db_synchronous: file.db_synchronous.unwrap_or(Synchronous::Full),
            database_url: database_url.map(Secret),
            database_pool_size,
            database_ca,
            drain_timeout: Duration::from_secs(drain_timeout_secs),
            metrics_listen: args.metrics_listen.or(file.metrics_listen),
            metrics_public: args.metrics_public || file.metrics_public.unwrap_or(false),
            limits,
            clock: quicnprotochat_core::clock::system(),
        })
    }
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_file(&text, &path.display().to_string())
}

fn parse_file(text: &str, path: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_string(),
        // The message names the key and line; it does not echo values.
        message: e.message().to_string(),
    })
}

/// Parses a 64-hex-character raw key.  The error never contains the value.
pub fn parse_db_key(s: &str) -> Result<KeyBytes, ConfigError> {
    let bytes = hex::decode(s.trim()).map_err(|_| ConfigError::Invalid {
        setting: "db_key",
        reason: "must be 64 hexadecimal characters (a raw 256-bit key)".into(),
    })?;
    let arr: [u8; 32] = bytes.try_into().map_err(|_| ConfigError::Invalid {
        setting: "db_key",
        reason: "must be 64 hexadecimal characters (a raw 256-bit key)".into(),
    })?;
    Ok(KeyBytes(arr))
}

fn validate_limits(l: &Limits) -> Result<(), ConfigError> {
    let check = |ok: bool, setting: &'static str, reason: &str| {
        if ok {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                setting,
                reason: reason.into(),
            })
        }
    };
    check(
        l.queue_depth >= 1,
        "limits.queue_depth",
        "must be at least 1",
    )?;
    check(
        l.stranger_queue_depth >= 1,
        "limits.stranger_queue_depth",
        "must be at least 1",
    )?;
    check(
        (1..=l.stranger_queue_depth).contains(&l.stranger_messages_per_sender),
        "limits.stranger_messages_per_sender",
        "must be between 1 and limits.stranger_queue_depth",
    )?;
    check(
        (1..=quicnprotochat_proto::limits::MAX_PAYLOAD_BYTES).contains(&l.max_payload_bytes),
        "limits.max_payload_bytes",
        "must be between 1 and 5242880 (the protocol cap)",
    )?;
    check(
        l.max_connections >= 1,
        "limits.max_connections",
        "must be at least 1",
    )?;
    check(
        l.max_connections_per_ip >= 1,
        "limits.max_connections_per_ip",
        "must be at least 1",
    )?;
    check(
        (1..=MAX_TIMEOUT_SECS).contains(&l.auth_timeout_secs),
        "limits.auth_timeout_secs",
        "must be between 1 and 86400 (one day)",
    )?;
    check(
        (1..=MAX_TIMEOUT_SECS).contains(&l.idle_timeout_secs),
        "limits.idle_timeout_secs",
        "must be between 1 and 86400 (one day)",
    )?;
    check(
        (1..=MAX_TIMEOUT_SECS).contains(&l.frame_timeout_secs),
        "limits.frame_timeout_secs",
        "must be between 1 and 86400 (one day)",
    )?;
    check(
        (1..=MAX_TIMEOUT_SECS).contains(&l.request_timeout_secs),
        "limits.request_timeout_secs",
        "must be between 1 and 86400 (one day)",
    )?;
    check(
        l.connection_window_bytes >= 64 * 1024,
        "limits.connection_window_bytes",
        "must be at least 65536",
    )?;
    for (name, r) in [
        ("limits.rates.auth_per_ip", l.rates.auth_per_ip),
        ("limits.rates.auth_per_identity", l.rates.auth_per_identity),
        (
            "limits.rates.enqueue_per_identity",
            l.rates.enqueue_per_identity,
        ),
        ("limits.rates.enqueue_per_ip", l.rates.enqueue_per_ip),
        (
            "limits.rates.key_package_fetch_per_identity",
            l.rates.key_package_fetch_per_identity,
        ),
        (
            "limits.rates.key_package_fetch_per_ip",
            l.rates.key_package_fetch_per_ip,
        ),
    ] {
        check(
            r.per_second >= 1 && r.burst >= 1,
            name,
            "per_second and burst must be at least 1",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_db_key_forms() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("server.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:5000\"\ndb_key = \"\"\n[limits]\nqueue_depth = 7\n",
        )
        .unwrap();
        let args = ServerArgs {
            config: Some(file.clone()),
            listen: Some("127.0.0.1:6000".parse().unwrap()),
            ..Default::default()
        };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.listen.port(), 6000);
        assert_eq!(c.db_key, DbKeySetting::Disabled);
        assert_eq!(c.limits.queue_depth, 7);
        assert_eq!(c.limits.max_connections, DEFAULT_MAX_CONNECTIONS);

        let bad = ServerArgs {
            db_key: Some("abcd".into()),
            ..Default::default()
        };
        let err = Config::resolve(&bad).unwrap_err().to_string();
        assert!(err.contains("db_key") && !err.contains("abcd"), "{err}");
    }

    #[test]
    fn a_file_given_as_text_resolves_like_a_file_on_disk() {
        let c = Config::from_toml_str("listen = \"127.0.0.1:5000\"\n[limits]\nqueue_depth = 7\n")
            .unwrap();
        assert_eq!(c.listen.port(), 5000);
        assert_eq!(c.limits.queue_depth, 7);
        assert_eq!(c.db_key, DbKeySetting::DevGenerated);
        assert!(matches!(
            Config::from_toml_str("lisen = 1"),
            Err(ConfigError::Parse { path, .. }) if path == "<string>"
        ));
        assert!(matches!(
            Config::from_toml_str("[limits]\nqueue_depth = 0\n"),
            Err(ConfigError::Invalid {
                setting: "limits.queue_depth",
                ..
            })
        ));
    }

    /// The server_config fuzz target's invariant (every accepted timeout fits
    /// in a deadline) failed on this file.
    #[test]
    fn timeouts_too_long_for_a_deadline_are_refused() {
        let input: &[u8] = b"[limits]\nframe_timeout_secs = 9223372036854775807\n";
        let text = std::str::from_utf8(input).unwrap();
        assert!(matches!(
            Config::from_toml_str(text),
            Err(ConfigError::Invalid {
                setting: "limits.frame_timeout_secs",
                ..
            })
        ));
        for key in [
            "auth_timeout_secs",
            "idle_timeout_secs",
            "frame_timeout_secs",
            "request_timeout_secs",
        ] {
            let day = format!("[limits]\n{key} = {MAX_TIMEOUT_SECS}\n");
            assert!(Config::from_toml_str(&day).is_ok(), "{key}");
            let more = format!("[limits]\n{key} = {}\n", MAX_TIMEOUT_SECS + 1);
            assert!(Config::from_toml_str(&more).is_err(), "{key}");
        }
    }

    #[test]
    fn the_drain_timeout_comes_from_flag_or_file_and_is_bounded() {
        assert_eq!(
            Config::from_toml_str("").unwrap().drain_timeout,
            DEFAULT_DRAIN_TIMEOUT
        );
        let c = Config::from_toml_str("drain_timeout_secs = 0\n").unwrap();
        assert_eq!(c.drain_timeout, Duration::ZERO);
        let args = ServerArgs {
            drain_timeout_secs: Some(12),
            ..Default::default()
        };
        let file = parse_file("drain_timeout_secs = 3\n", "<string>").unwrap();
        assert_eq!(
            Config::merge(&args, file).unwrap().drain_timeout,
            Duration::from_secs(12)
        );
        let day = format!("drain_timeout_secs = {}\n", MAX_TIMEOUT_SECS + 1);
        assert!(matches!(
            Config::from_toml_str(&day),
            Err(ConfigError::Invalid {
                setting: "drain_timeout_secs",
                ..
            })
        ));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("server.toml");
        std::fs::write(&file, "lisen = \"127.0.0.1:5000\"\n").unwrap();
        let args = ServerArgs {
            config: Some(file),
            ..Default::default()
        };
        assert!(matches!(
            Config::resolve(&args),
            Err(ConfigError::Parse { .. })
        ));
    }
}

#[cfg(test)]
mod cli_tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn server_options_count_before_and_after_serve_and_after_wins() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).unwrap();
        let before = parse(&["s", "--data-dir", "before", "serve"]);
        assert!(matches!(before.command, Some(Command::Serve)));
        assert_eq!(before.options.data_dir, Some(PathBuf::from("before")));
        let after = parse(&["s", "serve", "--data-dir", "after", "--mode", "production"]);
        assert_eq!(after.options.data_dir, Some(PathBuf::from("after")));
        assert_eq!(after.options.mode, Some(Mode::Production));
        let both = parse(&[
            "s",
            "--listen",
            "127.0.0.1:1",
            "--data-dir",
            "kept",
            "serve",
            "--listen",
            "127.0.0.1:2",
        ]);
        assert_eq!(both.options.listen, Some("127.0.0.1:2".parse().unwrap()));
        assert_eq!(both.options.data_dir, Some(PathBuf::from("kept")));
        let bare = parse(&["s", "--data-dir", "d"]);
        assert!(bare.command.is_none());
        assert_eq!(bare.options.data_dir, Some(PathBuf::from("d")));
        let health = parse(&["s", "health", "--data-dir", "h", "--timeout-secs", "2"]);
        assert_eq!(health.options.data_dir, Some(PathBuf::from("h")));
    }
}
