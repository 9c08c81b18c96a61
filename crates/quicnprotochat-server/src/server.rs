//! Start-up, the accept loop, and per-connection lifecycle.
//!
//! [`Server::bind`] resolves secrets and TLS material, opens the store and
//! binds the UDP socket; [`Server::serve`] runs until its shutdown future
//! resolves.  Both run inside a tokio `LocalSet` (Cap'n Proto RPC is
//! single-threaded); [`spawn`] runs a server on a thread of its own, which is
//! what tests and embedders use.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use quicnprotochat_proto::framing::FrameLimits;
use quicnprotochat_proto::rustls::pki_types::pem::PemObject as _;
use quicnprotochat_proto::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use quicnprotochat_proto::{limits, transport};
use quinn::{IdleTimeout, VarInt};

use crate::config::{Config, DbKeySetting, Mode};
use crate::delivery::{Delivery, Peer};
use crate::drain::{Calls, Drain, DrainSignal};
use crate::error::ServerError;
use crate::lock::{DataDirLock, lock_data_dir};
use crate::metrics::{Metrics, StoreMetrics};
use crate::production;
use crate::rpc;
use crate::store::Store;
use crate::store::postgres::{PgOptions, PgStore};
use crate::store::sqlite::{DB_FILE_NAME, DbKey, SqliteOptions, SqliteStore};

/// Development certificate and key, generated into the data directory.
pub const DEV_CERT_FILE: &str = "dev-cert.pem";
/// See [`DEV_CERT_FILE`].
pub const DEV_KEY_FILE: &str = "dev-key.pem";
/// Development database key, generated into the data directory.
pub const DEV_DB_KEY_FILE: &str = "dev-db.key";

/// Application close codes (QUIC CONNECTION_CLOSE).
pub mod close_code {
    /// normal close
    pub const NORMAL: u32 = 0;
    /// not authenticated before the deadline
    pub const AUTH_TIMEOUT: u32 = 1;
    /// the RPC stream failed (framing limits, malformed messages)
    pub const PROTOCOL_ERROR: u32 = 2;
    /// the server is shutting down
    pub const SHUTDOWN: u32 = 3;
}

/// How often expired key packages and idempotency keys are purged, and idle
/// rate-limiter buckets forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// A bound, ready server.
pub struct Server {
    endpoint: quinn::Endpoint,
    delivery: Rc<Delivery>,
    fingerprint: [u8; 32],
    limits_frame: FrameLimits,
    drain_timeout: Duration,
    /// the operator's HTTP endpoint (metrics, probes), when configured
    http: Option<tokio::net::TcpListener>,
    /// the data directory's lock, held while the embedded store is open
    _lock: Option<DataDirLock>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Validates the configuration, prepares secrets and TLS, opens the store
    /// and binds the socket.  Must run inside a tokio runtime.
    pub async fn bind(config: &Config) -> Result<Self, ServerError> {
        let production = config.mode == Mode::Production;
        if production {
            production::check_config(config)?;
        }
        create_private_dir(&config.data_dir)?;
        production::check_writable(&config.data_dir)?;
        match production::check_private_dir(&config.data_dir) {
            Err(ServerError::Production { reason, .. }) if !production => {
                tracing::warn!(%reason, "DEVELOPMENT SHORTCUT: the data directory is not private");
            }
            r => r?,
        }
        let tokens = crate::tokens::accepted_tokens(config)?;
        let (chain, private_key) = tls_material(config)?;
        let leaf = chain
            .first()
            .ok_or_else(|| ServerError::Tls("empty certificate chain".into()))?;
        let fingerprint = transport::fingerprint(leaf);
        let crypto = transport::server_crypto(chain, private_key).map_err(|e| match e {
            transport::TransportError::Tls(
                quicnprotochat_proto::rustls::Error::InconsistentKeys(_),
            ) => {
                ServerError::Tls("key_path: the private key does not match the certificate".into())
            }
            e => ServerError::Tls(e.to_string()),
        })?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server_config.transport_config(Arc::new(transport_config(config)?));

        // The embedded database belongs to this process while it runs:
        // `restore` and `rekey` refuse to replace it under the server.
        let lock = match config.database_url {
            None => Some(lock_data_dir(&config.data_dir, "serve")?),
            Some(_) => None,
        };
        let store_metrics = StoreMetrics::default();
        let store = open_store(config, &store_metrics).await?;
        let backend = if config.database_url.is_some() {
            "postgres"
        } else {
            "sqlite"
        };
        let metrics = Arc::new(Metrics::new(backend, store_metrics));
        let http = match config.metrics_listen {
            Some(addr) => {
                let listener = crate::http::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind { addr, source })?;
                tracing::info!(
                    http_addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                    "operator endpoint bound: HTTP /metrics, /livez, /readyz"
                );
                Some(listener)
            }
            None => None,
        };

        let bind_err = |source| ServerError::Bind {
            addr: config.listen,
            source,
        };
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            udp_socket(config.listen).map_err(bind_err)?,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_err)?;
        let delivery = Rc::new(Delivery::new(
            store,
            config.limits.clone(),
            crate::tokens::hashes(&tokens),
            config.clock.clone(),
            metrics,
        ));
        let limits_frame = FrameLimits {
            max_frame_bytes: limits::MAX_FRAME_BYTES,
            frame_timeout: Duration::from_secs(config.limits.frame_timeout_secs),
        };
        tracing::info!(
            addr = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            mode = ?config.mode,
            version = quicnprotochat_proto::SOFTWARE_VERSION,
            "listening"
        );
        Ok(Self {
            endpoint,
            delivery,
            fingerprint,
            limits_frame,
            drain_timeout: config.drain_timeout,
            http,
            _lock: lock,
        })
    }

    /// The bound address of the HTTP endpoint, when there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Result<SocketAddr, std::io::Error> {
        self.endpoint.local_addr()
    }

    /// SHA-256 fingerprint of the certificate in use.
    pub fn cert_fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// A handle that replaces the access tokens this server accepts while
    /// it serves (SIGHUP); must be used on the server's `LocalSet`.
    pub fn token_reloader(&self) -> TokenReloader {
        TokenReloader {
            delivery: self.delivery.clone(),
        }
    }

    /// Accepts connections until `shutdown` resolves, then drains: new
    /// connections are refused and calls that arrive are refused with a
    /// `disconnected` exception (clients retry them elsewhere), the calls in
    /// flight run to their answer, and each connection is closed (code
    /// [`close_code::SHUTDOWN`]) as soon as it has no call in flight and the
    /// client received its answers.  Connections still busy when the drain
    /// timeout passes are closed then (their calls get no answer).  Finally
    /// waits up to 3 s for the closes to reach the clients.  Must run in a
    /// `LocalSet`.
    pub async fn serve(mut self, shutdown: impl Future<Output = ()>) {
        let table = Rc::new(RefCell::new(ConnTable::default()));
        let drain = Drain::new();
        // Probes answer until the very end: readiness turns false as the
        // drain starts, so load balancers stop sending new clients.
        let http = self.http.take().map(|listener| {
            tokio::task::spawn_local(crate::http::serve(
                listener,
                self.delivery.clone(),
                drain.signal(),
            ))
        });
        let sweeper = tokio::task::spawn_local(sweep_loop(self.delivery.clone()));
        // On a store shared by several nodes: pushes for what the others
        // enqueue.
        let follower = {
            let delivery = self.delivery.clone();
            tokio::task::spawn_local(async move { delivery.follow_changes().await })
        };
        // Every page checked once, in the background: start-up stays fast,
        // and damage found makes the server report not ready.
        let checker = {
            let delivery = self.delivery.clone();
            tokio::task::spawn_local(async move { delivery.check_integrity().await })
        };
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => self.admit(incoming, &table, drain.signal()),
                    None => break,
                },
                () = &mut shutdown => break,
            }
        }
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        tracing::info!(
            connections = table.borrow().total,
            drain_timeout_secs = self.drain_timeout.as_secs_f32(),
            "shutting down: draining connections"
        );
        sweeper.abort();
        checker.abort();
        follower.abort();
        drain.start(deadline);
        let closed = table.borrow().closed.clone();
        let drained = async {
            loop {
                // Registered before the count is read: no close is missed.
                let next_close = closed.notified();
                if table.borrow().total == 0 {
                    break;
                }
                next_close.await;
            }
        };
        let refuse = async {
            while let Some(incoming) = self.endpoint.accept().await {
                self.delivery.metrics.refused("shutting_down");
                incoming.refuse();
            }
        };
        tokio::select! {
            r = tokio::time::timeout_at(deadline, drained) => match r {
                Ok(()) => tracing::info!("drained: every connection closed"),
                Err(_) => tracing::warn!(
                    connections = table.borrow().total,
                    "drain timeout: closing connections with calls still in flight"
                ),
            },
            () = refuse => {}
        }
        self.endpoint.close(
            VarInt::from_u32(close_code::SHUTDOWN),
            b"server shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(3), self.endpoint.wait_idle()).await;
        if let Some(http) = http {
            http.abort();
        }
    }

    fn admit(&self, incoming: quinn::Incoming, table: &Rc<RefCell<ConnTable>>, drain: DrainSignal) {
        let ip = incoming.remote_address().ip();
        let limits = &self.delivery.limits;
        let metrics = &self.delivery.metrics;
        let (total, from_ip) = table.borrow().counts(ip);
        if total >= limits.max_connections || from_ip >= limits.max_connections_per_ip {
            tracing::debug!(%ip, total, from_ip, "connection refused: over the connection cap");
            metrics.refused(if total >= limits.max_connections {
                "max_connections"
            } else {
                "max_connections_per_ip"
            });
            incoming.refuse();
            return;
        }
        // Under load, make unvalidated peers prove their address first
        // (a stateless retry costs one round trip and defeats spoofed floods).
        if total >= limits.max_connections / 2 && !incoming.remote_address_validated() {
            if let Err(e) = incoming.retry() {
                tracing::debug!(error = %e, "retry failed");
            }
            return;
        }
        let guard = ConnGuard::new(table.clone(), ip, metrics.clone());
        metrics.connections_accepted.inc();
        let delivery = self.delivery.clone();
        let frame = self.limits_frame;
        tokio::task::spawn_local(async move {
            let _guard = guard;
            let auth_timeout = Duration::from_secs(delivery.limits.auth_timeout_secs);
            let mut draining = drain.clone();
            let handshake = tokio::select! {
                r = tokio::time::timeout(auth_timeout, incoming) => r,
                // A handshake still running when the drain starts is dropped
                // (the endpoint's close reaches it).
                _ = draining.wait() => return,
            };
            let conn = match handshake {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    tracing::debug!(%ip, error = %e, "handshake failed");
                    delivery.metrics.refused("handshake_failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%ip, "handshake timed out");
                    delivery.metrics.refused("handshake_timeout");
                    return;
                }
            };
            serve_connection(delivery, conn, frame, auth_timeout, drain).await;
        });
    }
}

/// Replaces the access tokens of a serving server (see
/// [`Server::token_reloader`]).
pub struct TokenReloader {
    delivery: Rc<Delivery>,
}

impl std::fmt::Debug for TokenReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReloader").finish_non_exhaustive()
    }
}

impl TokenReloader {
    /// Accepts exactly the tokens `config` names from now on (judged as at
    /// start: production mode checks each), and returns how many; on error
    /// the tokens in use are kept.  Connections already authenticated stay.
    pub fn reload(&self, config: &Config) -> Result<usize, ServerError> {
        let tokens = crate::tokens::accepted_tokens(config)?;
        self.delivery
            .set_token_hashes(crate::tokens::hashes(&tokens));
        Ok(tokens.len())
    }
}

/// How a connection's session ended.
enum Ended {
    /// the client closed the RPC stream
    Normally,
    /// the stream failed (framing limits, malformed messages)
    Failed(String),
    /// the server drained it
    Shutdown,
}

async fn serve_connection(
    delivery: Rc<Delivery>,
    conn: quinn::Connection,
    frame: FrameLimits,
    auth_timeout: Duration,
    drain: DrainSignal,
) {
    let peer = Rc::new(Peer::new(conn.remote_address().ip()));
    let metrics = delivery.metrics.clone();
    let session = session(delivery, peer.clone(), conn.clone(), frame, drain);
    let watchdog = {
        let peer = peer.clone();
        async move {
            tokio::time::sleep(auth_timeout).await;
            if peer.is_authenticated() {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        ended = session => match ended {
            Ended::Normally => {
                metrics.closed("normal");
                conn.close(VarInt::from_u32(close_code::NORMAL), b"bye");
            }
            Ended::Failed(_) if conn.close_reason().is_some() => {
                // Closed by the client, or timed out: no fault of the stream.
                metrics.closed("lost");
            }
            Ended::Failed(e) => {
                tracing::debug!(ip = %peer.ip, error = %e, "connection ended with an error");
                metrics.closed("protocol_error");
                conn.close(VarInt::from_u32(close_code::PROTOCOL_ERROR), b"protocol error");
            }
            Ended::Shutdown => {
                metrics.closed("shutdown");
                conn.close(
                    VarInt::from_u32(close_code::SHUTDOWN),
                    b"server shutting down",
                );
            }
        },
        () = watchdog => {
            tracing::info!(ip = %peer.ip, "closing connection: not authenticated in time");
            metrics.closed("auth_timeout");
            conn.close(VarInt::from_u32(close_code::AUTH_TIMEOUT), b"authentication timeout");
        }
    }
}

/// Runs the connection's RPC session until it ends or the server drains it:
/// then the calls in flight are answered (new ones refused), the session
/// ends once its answers are written, and the client has received them
/// when this returns, unless the drain deadline came first.
async fn session(
    delivery: Rc<Delivery>,
    peer: Rc<Peer>,
    conn: quinn::Connection,
    frame: FrameLimits,
    mut drain: DrainSignal,
) -> Ended {
    let stream = tokio::select! {
        s = conn.accept_bi() => s,
        _ = drain.wait() => return Ended::Shutdown,
    };
    let (send, recv) = match stream {
        Ok(s) => s,
        Err(e) => return Ended::Failed(e.to_string()),
    };
    // Resolves once the stream is finished and the client acknowledged
    // every byte of it.
    let delivered = send.stopped();
    let calls = Calls::new(drain.clone());
    let mut rpc = rpc::Rpc::start(delivery, peer, conn, (send, recv), frame, calls.clone());
    let deadline = tokio::select! {
        r = rpc.ended() => return match r {
            Ok(()) => Ended::Normally,
            Err(e) => Ended::Failed(e),
        },
        deadline = drain.wait() => deadline,
    };
    let answered = async {
        calls.idle().await;
        // The last answer is queued by the session task as its call
        // returns; let that task run before the session is ended.
        tokio::task::yield_now().await;
        rpc.disconnect().await;
        let _ = delivered.await;
    };
    if tokio::time::timeout_at(deadline, answered).await.is_err() {
        tracing::debug!(
            in_flight = calls.in_flight(),
            "drain deadline passed with calls in flight"
        );
    }
    Ended::Shutdown
}

async fn sweep_loop(delivery: Rc<Delivery>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tick.tick().await;
        delivery.sweep().await;
    }
}

/// Live connections, overall and per IP.
#[derive(Default)]
struct ConnTable {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    /// notified whenever a connection ends (the drain waits for the last)
    closed: Rc<tokio::sync::Notify>,
}

impl ConnTable {
    fn counts(&self, ip: IpAddr) -> (usize, usize) {
        (self.total, self.per_ip.get(&ip).copied().unwrap_or(0))
    }
}

/// Counts one connection for its lifetime.
struct ConnGuard {
    table: Rc<RefCell<ConnTable>>,
    ip: IpAddr,
    metrics: Arc<Metrics>,
}

impl ConnGuard {
    fn new(table: Rc<RefCell<ConnTable>>, ip: IpAddr, metrics: Arc<Metrics>) -> Self {
        {
            let mut t = table.borrow_mut();
            t.total += 1;
            *t.per_ip.entry(ip).or_insert(0) += 1;
        }
        metrics.connections_open.inc();
        Self { table, ip, metrics }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.metrics.connections_open.dec();
        let mut t = self.table.borrow_mut();
        t.total = t.total.saturating_sub(1);
        if let Some(n) = t.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.per_ip.remove(&self.ip);
            }
        }
        t.closed.notify_waiters();
    }
}

/// The store's key: the configured one, the development key kept in the
/// data directory, or none (each shortcut with a warning).
pub(crate) fn database_key(config: &Config) -> Result<DbKey, ServerError> {
    Ok(match &config.db_key {
        DbKeySetting::Provided(k) => DbKey::Raw(k.0),
        DbKeySetting::DevGenerated => {
            let path = config.data_dir.join(DEV_DB_KEY_FILE);
            tracing::warn!(
                path = %path.display(),
                "DEVELOPMENT SHORTCUT: no database key configured; using a generated key stored next to the database"
            );
            DbKey::Raw(load_or_create_dev_db_key(&path)?)
        }
        DbKeySetting::Disabled => {
            tracing::warn!("DEVELOPMENT SHORTCUT: db_key is empty: the database is NOT encrypted");
            DbKey::Unencrypted
        }
    })
}

/// The certificate chain and private key: the configured files (refused in
/// production when they are the development certificate or out of their
/// validity period), or the development certificate of the data directory.
fn tls_material(
    config: &Config,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ServerError> {
    let production = config.mode == Mode::Production;
    Ok(match &config.tls_paths {
        Some((cert, key)) => {
            let material = load_tls(cert, key)?;
            let leaf = material.0.first().map(|c| c.as_ref()).unwrap_or_default();
            if let Err(refusal) = production::check_not_development_tls(
                cert,
                key,
                &config.data_dir,
                (DEV_CERT_FILE, DEV_KEY_FILE),
                leaf,
            ) {
                if production {
                    return Err(refusal);
                }
                tracing::warn!(
                    path = %cert.display(),
                    "DEVELOPMENT SHORTCUT: the configured certificate is the development certificate"
                );
            }
            if let Err(why) = production::certificate_validity(
                leaf,
                i64::try_from(config.clock.unix_secs()).unwrap_or(i64::MAX),
            ) {
                if production {
                    return Err(ServerError::Production {
                        setting: "cert_path",
                        reason: why,
                    });
                }
                tracing::warn!(reason = %why, "DEVELOPMENT SHORTCUT: serving a certificate outside its validity period");
            }
            material
        }
        None => {
            let (chain, key) = load_or_create_dev_cert(&config.data_dir)?;
            tracing::warn!(
                fingerprint = %hex::encode(transport::fingerprint(&chain[0])),
                "DEVELOPMENT SHORTCUT: self-signed certificate in the data directory; clients must pin this SHA-256 fingerprint"
            );
            (chain, key)
        }
    })
}

fn transport_config(config: &Config) -> Result<quinn::TransportConfig, ServerError> {
    let l = &config.limits;
    let mut t = quinn::TransportConfig::default();
    // One RPC session per connection on one bidirectional stream.
    t.max_concurrent_bidi_streams(VarInt::from_u32(1));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    let idle = IdleTimeout::try_from(Duration::from_secs(l.idle_timeout_secs)).map_err(|_| {
        ServerError::Transport {
            setting: "limits.idle_timeout_secs",
            reason: "out of the range QUIC allows",
        }
    })?;
    t.max_idle_timeout(Some(idle));
    t.receive_window(VarInt::from_u32(l.connection_window_bytes));
    t.stream_receive_window(VarInt::from_u32(l.connection_window_bytes));
    Ok(t)
}

/// Kernel receive and send buffers asked for the server's UDP socket.  The
/// Linux default (about 208 KiB) overflows under a burst of handshakes
/// (every client's first flight is 1200-byte datagrams), and each dropped
/// datagram costs its client a retransmission timeout: seconds.  4 MiB
/// holds about 3 000 datagrams; the kernel grants at most
/// `net.core.rmem_max` / `wmem_max`, and a smaller grant is logged.
const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// The server's UDP socket, bound to `addr`, with [`UDP_BUFFER_BYTES`]
/// buffers where the kernel allows them.
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    for (what, set, get) in [
        (
            "receive",
            Socket::set_recv_buffer_size as fn(&Socket, usize) -> std::io::Result<()>,
            Socket::recv_buffer_size as fn(&Socket) -> std::io::Result<usize>,
        ),
        (
            "send",
            Socket::set_send_buffer_size,
            Socket::send_buffer_size,
        ),
    ] {
        // Linux reports twice what was granted (bookkeeping included).
        let granted = set(&socket, UDP_BUFFER_BYTES).and_then(|()| get(&socket));
        match granted {
            Ok(n) if n >= UDP_BUFFER_BYTES => {}
            Ok(n) => tracing::info!(
                buffer = what,
                granted_bytes = n,
                wanted_bytes = UDP_BUFFER_BYTES,
                "the kernel caps the UDP socket's buffer: raise net.core.rmem_max and net.core.wmem_max to at least the wanted size, or bursts of handshakes may see packet loss"
            ),
            Err(e) => {
                tracing::info!(buffer = what, error = %e, "cannot size the UDP socket's buffer")
            }
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn create_private_dir(dir: &Path) -> Result<(), ServerError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| ServerError::File {
            what: "data directory",
            path: dir.display().to_string(),
            source,
        })
}

fn write_private_file(path: &Path, what: &'static str, bytes: &[u8]) -> Result<(), ServerError> {
    let err = |source| ServerError::File {
        what,
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

fn load_or_create_dev_db_key(path: &Path) -> Result<[u8; 32], ServerError> {
    if path.exists() {
        let text = std::fs::read_to_string(path).map_err(|source| ServerError::File {
            what: "development database key",
            path: path.display().to_string(),
            source,
        })?;
        return Ok(crate::config::parse_db_key(&text)?.0);
    }
    let mut key = [0; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| ServerError::Rng)?;
    write_private_file(
        path,
        "development database key",
        hex::encode(key).as_bytes(),
    )?;
    Ok(key)
}

pub(crate) type TlsMaterial = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn load_tls(cert: &Path, key: &Path) -> Result<TlsMaterial, ServerError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ServerError::Tls(format!("cert_path: cannot read {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(ServerError::Tls(format!(
            "cert_path: no certificate in {}",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ServerError::Tls(format!("key_path: cannot read {}: {e}", key.display())))?;
    Ok((chain, key))
}

/// A new development certificate and its key, as PEM: self-signed for
/// [`production::DEV_CERT_NAMES`], with the subject
/// [`production::DEV_CERT_COMMON_NAME`] by which production mode refuses it.
fn generate_dev_cert() -> Result<(String, String), ServerError> {
    let err =
        |e: rcgen::Error| ServerError::Tls(format!("generating a development certificate: {e}"));
    let names: Vec<String> = production::DEV_CERT_NAMES
        .iter()
        .map(|n| (*n).to_string())
        .collect();
    let mut params = rcgen::CertificateParams::new(names).map_err(err)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, production::DEV_CERT_COMMON_NAME);
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = params.self_signed(&key).map_err(err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Loads the development certificate and key of `dir`, generating them when
/// either is missing.
pub(crate) fn load_or_create_dev_cert(dir: &Path) -> Result<TlsMaterial, ServerError> {
    let cert_path: PathBuf = dir.join(DEV_CERT_FILE);
    let key_path: PathBuf = dir.join(DEV_KEY_FILE);
    if !cert_path.exists() || !key_path.exists() {
        let (cert_pem, key_pem) = generate_dev_cert()?;
        let _ = std::fs::remove_file(&cert_path);
        let _ = std::fs::remove_file(&key_path);
        write_private_file(&key_path, "development TLS key", key_pem.as_bytes())?;
        write_private_file(
            &cert_path,
            "development TLS certificate",
            cert_pem.as_bytes(),
        )?;
    }
    load_tls(&cert_path, &key_path)
}

/// Opens the configured store: PostgreSQL when `database_url` is set, the
/// embedded SQLCipher database in the data directory otherwise.
async fn open_store(
    config: &Config,
    metrics: &StoreMetrics,
) -> Result<Arc<dyn Store>, ServerError> {
    let Some(url) = &config.database_url else {
        let key = database_key(config)?;
        let mut options = SqliteOptions::new(config.data_dir.join(DB_FILE_NAME), key);
        options.synchronous = config.db_synchronous;
        options.metrics = metrics.clone();
        return Ok(Arc::new(SqliteStore::open(options)?));
    };
    if !matches!(config.db_key, crate::config::DbKeySetting::DevGenerated) {
        tracing::warn!(
            "db_key is set but unused: the store is PostgreSQL (encryption at rest is the database's disks')"
        );
    }
    let mut options = PgOptions::new(url.0.clone());
    options.pool_size = config.database_pool_size;
    options.ca_file = config.database_ca.clone();
    options.metrics = metrics.clone();
    if options.ca_file.is_none() {
        tracing::warn!(
            "the connection to PostgreSQL is not TLS (database_ca is not set): use a Unix socket or loopback"
        );
    }
    let store = PgStore::connect(options).await?;
    match store.durability_problem().await? {
        Some(problem) if config.mode == Mode::Production => {
            return Err(ServerError::Production {
                setting: "database_url",
                reason: format!(
                    "{problem}: an acknowledged message could be lost in a crash of the database machine"
                ),
            });
        }
        Some(problem) => tracing::warn!(
            %problem,
            "DEVELOPMENT SHORTCUT: the database does not make commits durable; an acknowledged message can be lost in a crash of the database machine"
        ),
        None => {}
    }
    tracing::info!(pool_size = config.database_pool_size, "store: PostgreSQL");
    Ok(Arc::new(store))
}

/// A server running on its own thread (current-thread runtime + `LocalSet`).
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    fingerprint: [u8; 32],
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// SHA-256 fingerprint of the server certificate.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Stops the server and waits for its thread (and the store) to finish.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("server thread panicked");
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds and runs a server on a new thread; returns once it is listening.
pub fn spawn(config: Config) -> Result<ServerHandle, ServerError> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("quicnprotochat-server".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(ServerError::File {
                        what: "tokio runtime",
                        path: String::new(),
                        source: e,
                    }));
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let server = match Server::bind(&config).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let info = server.local_addr().map(|a| (a, server.cert_fingerprint()));
                match info {
                    Ok(info) => {
                        let _ = ready_tx.send(Ok(info));
                    }
                    Err(source) => {
                        let _ = ready_tx.send(Err(ServerError::Bind {
                            addr: config.listen,
                            source,
                        }));
                        return;
                    }
                }
                server
                    .serve(async {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
        })
        .map_err(|source| ServerError::File {
            what: "server thread",
            path: String::new(),
            source,
        })?;
    match ready_rx.recv() {
        Ok(Ok((addr, fingerprint))) => Ok(ServerHandle {
            addr,
            fingerprint,
            shutdown: Some(stop_tx),
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(ServerError::ThreadExited)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's cap on a socket buffer a process may ask for, in bytes.
    fn kernel_cap(name: &str) -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn the_udp_socket_gets_the_buffers_the_kernel_allows() {
        let socket = socket2::Socket::from(udp_socket("127.0.0.1:0".parse().unwrap()).unwrap());
        // Linux reports twice the granted size.
        let want = |cap: usize| 2 * UDP_BUFFER_BYTES.min(cap);
        assert!(socket.recv_buffer_size().unwrap() >= want(kernel_cap("rmem_max")));
        assert!(socket.send_buffer_size().unwrap() >= want(kernel_cap("wmem_max")));
        assert!(socket.local_addr().unwrap().as_socket().unwrap().port() != 0);
    }
}
