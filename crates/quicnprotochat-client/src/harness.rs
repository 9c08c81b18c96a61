//! Shared test harness (feature `test-harness`), used by every crate's
//! integration tests: installs the rustls ring provider once per process,
//! starts a real server on port 0 in a temporary data directory, and creates
//! authenticated, registered clients.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use quicnprotochat_core::Identity;
use quicnprotochat_proto::transport::{self, ServerAuth};
use quicnprotochat_server::config::{Config, Secret};
use quicnprotochat_server::{ServerError, ServerHandle};

mod postgres;
pub use postgres::{PgCluster, PgClusterError, PgTls, TEST_DATABASE_URL_ENV, TestDatabase};

use crate::{
    Client, ClientConfig, ClientError, Event, EventStream, Messenger, MessengerError, ProfileKey,
};

/// The access token of test servers (not a development default, never in docs).
pub const TEST_TOKEN: &str = "harness-token-0123456789abcdef0123456789";

/// The passphrase of test profiles.
pub const TEST_PASSPHRASE: &str = "harness-profile-passphrase";

/// The profile key of test profiles.
pub fn test_profile_key() -> ProfileKey {
    ProfileKey::Passphrase(TEST_PASSPHRASE.into())
}

/// Harness failures.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// the server did not start
    #[error("server: {0}")]
    Server(#[from] ServerError),
    /// a client operation failed
    #[error("client: {0}")]
    Client(#[from] ClientError),
    /// temp dir or similar
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// the server is stopped
    #[error("the test server is stopped")]
    Stopped,
    /// a messenger operation failed
    #[error("messenger: {0}")]
    Messenger(#[from] MessengerError),
    /// the server process did not come up
    #[error("server process: {0}")]
    Process(String),
    /// an expected event did not come (or an unexpected one did)
    #[error("events: {0}")]
    Events(String),
}

/// How long event helpers wait.
pub const EVENT_WAIT: Duration = Duration::from_secs(20);

/// Waits (up to [`EVENT_WAIT`]) for the next event matching `pred`, skipping others.
pub async fn expect_event(
    stream: &mut EventStream,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> Result<Event, HarnessError> {
    let deadline = tokio::time::Instant::now() + EVENT_WAIT;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(e)) if pred(&e) => return Ok(e),
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(HarnessError::Events(format!(
                    "stream ended waiting for {what}"
                )));
            }
            Err(_) => {
                return Err(HarnessError::Events(format!(
                    "timed out waiting for {what}"
                )));
            }
        }
    }
}

/// The next `n` messages as (sender, text).
pub async fn next_messages(
    stream: &mut EventStream,
    n: usize,
) -> Result<Vec<(String, String)>, HarnessError> {
    let mut out = Vec::new();
    while out.len() < n {
        if let Event::Message(m) =
            expect_event(stream, "a message", |e| matches!(e, Event::Message(_))).await?
        {
            out.push((m.sender, m.text));
        }
    }
    Ok(out)
}

/// The texts of the messages among `events`, in order.
pub fn message_texts(events: Vec<Event>) -> Vec<String> {
    events
        .into_iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.text),
            _ => None,
        })
        .collect()
}

/// Fails if a message arrives within `quiet`.
pub async fn expect_no_message(
    stream: &mut EventStream,
    quiet: Duration,
) -> Result<(), HarnessError> {
    let deadline = tokio::time::Instant::now() + quiet;
    while let Ok(Some(e)) = tokio::time::timeout_at(deadline, stream.next()).await {
        if let Event::Message(m) = e {
            return Err(HarnessError::Events(format!("unexpected message {m:?}")));
        }
    }
    Ok(())
}

/// Registers `username` with a new profile in `profiles/<username>` under `root`.
async fn register_messenger(
    root: &Path,
    config: ClientConfig,
    username: &str,
) -> Result<Messenger, HarnessError> {
    let dir = root.join("profiles").join(username);
    Ok(Messenger::register(&dir, &test_profile_key(), config, username).await?)
}

/// Opens the profile of `username` under `root` again (a restarted client).
async fn reopen_messenger(root: &Path, username: &str) -> Result<Messenger, HarnessError> {
    let dir = root.join("profiles").join(username);
    Ok(Messenger::open(&dir, &test_profile_key(), None).await?)
}

/// An impostor: a client whose MLS credential claims the name `claimed`
/// (another user's) while it registers on the server as `registered`; it
/// makes `group` and adds `victim` to it (the Welcome is queued for the
/// victim).  Its profile lives in `dir`.  Returns the impostor's identity
/// key.
pub async fn impostor_adds(
    config: ClientConfig,
    dir: &Path,
    claimed: &str,
    registered: &str,
    group: &str,
    victim: quicnprotochat_core::IdentityKey,
) -> Result<quicnprotochat_core::IdentityKey, HarnessError> {
    let mut impostor = quicnprotochat_core::Profile::create(
        dir,
        &ProfileKey::Passphrase("impostor".into()),
        claimed,
    )
    .map_err(MessengerError::from)?;
    let c = Client::connect(config).await?;
    c.init_auth(impostor.identity()).await?;
    c.register(registered).await?;
    impostor.create_group(group).map_err(MessengerError::from)?;
    let (kp, _) = c.fetch_key_package(victim).await?;
    let out = impostor
        .add_member(group, &kp, victim)
        .map_err(MessengerError::from)?;
    impostor
        .confirm_commit(&out.group_id)
        .map_err(MessengerError::from)?;
    if let Some(w) = out.welcome {
        c.enqueue(&w.recipients, w.message_id, w.payload).await?;
    }
    Ok(impostor.identity_key())
}

/// Installs ring as the process-level rustls provider, exactly once;
/// "already installed" is not an error.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(transport::install_default_provider);
}

/// A server on loopback port 0 with its own temporary data directory.
#[derive(Debug)]
pub struct TestServer {
    handle: Option<ServerHandle>,
    config: Config,
    addr: SocketAddr,
    fingerprint: [u8; 32],
    dir: tempfile::TempDir,
}

/// An authenticated client with its identity.
#[derive(Debug)]
pub struct TestClient {
    /// the connection
    pub client: Client,
    /// its identity
    pub identity: Identity,
    /// its username
    pub username: String,
}

impl TestServer {
    /// Starts a server with test defaults.
    pub fn start() -> Result<Self, HarnessError> {
        Self::start_with(|_| {})
    }

    /// Starts a server after `adjust` changed the test configuration.
    pub fn start_with(adjust: impl FnOnce(&mut Config)) -> Result<Self, HarnessError> {
        install_crypto_provider();
        let dir = tempfile::tempdir()?;
        let mut config = Config::development(dir.path().join("data"));
        config.auth_token = Some(Secret(TEST_TOKEN.into()));
        adjust(&mut config);
        let handle = quicnprotochat_server::spawn(config.clone())?;
        let addr = handle.addr();
        let fingerprint = handle.fingerprint();
        Ok(Self {
            handle: Some(handle),
            config,
            addr,
            fingerprint,
            dir,
        })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The certificate fingerprint clients pin.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// The temporary directory holding the data directory (for other files).
    pub fn temp_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A client configuration that pins this server.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::new(self.addr, ServerAuth::Pinned(self.fingerprint), TEST_TOKEN)
    }

    /// Stops the server (waits for it and its store to shut down).
    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }

    /// Stops and starts the server on the same data directory and port.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop();
        let mut config = self.config.clone();
        config.listen = self.addr;
        let handle = quicnprotochat_server::spawn(config)?;
        self.fingerprint = handle.fingerprint();
        self.handle = Some(handle);
        Ok(())
    }

    /// An unauthenticated connection.
    pub async fn connect(&self) -> Result<Client, HarnessError> {
        if self.handle.is_none() {
            return Err(HarnessError::Stopped);
        }
        Ok(Client::connect(self.client_config()).await?)
    }

    /// A connection authenticated as `identity`.
    pub async fn connect_as(&self, identity: &Identity) -> Result<Client, HarnessError> {
        let client = self.connect().await?;
        client.init_auth(identity).await?;
        Ok(client)
    }

    /// A registered messenger (new profile) for `username`.
    pub async fn messenger(&self, username: &str) -> Result<Messenger, HarnessError> {
        register_messenger(self.dir.path(), self.client_config(), username).await
    }

    /// Alice and bob, registered, in group `group` (alice made it and
    /// invited bob), both synced: bob joined, and alice learned the
    /// delivery token bob announced on joining.
    pub async fn pair(&self, group: &str) -> Result<(Messenger, Messenger), HarnessError> {
        let alice = self.messenger("alice").await?;
        let bob = self.messenger("bob").await?;
        alice.invite(group, "bob").await?;
        bob.sync().await?;
        alice.sync().await?;
        Ok((alice, bob))
    }

    /// A registered messenger (new profile) for `username` that connects
    /// with `config` (another node's address, fallbacks, deadlines).
    pub async fn messenger_with(
        &self,
        username: &str,
        config: ClientConfig,
    ) -> Result<Messenger, HarnessError> {
        register_messenger(self.dir.path(), config, username).await
    }

    /// Reopens the profile of `username` (a client restart).
    pub async fn reopen_messenger(&self, username: &str) -> Result<Messenger, HarnessError> {
        reopen_messenger(self.dir.path(), username).await
    }

    /// A new identity, authenticated and registered as `username`.
    pub async fn client(&self, username: &str) -> Result<TestClient, HarnessError> {
        let identity = Identity::generate().map_err(ClientError::from)?;
        let client = self.connect_as(&identity).await?;
        client.register(username).await?;
        Ok(TestClient {
            client,
            identity,
            username: username.to_string(),
        })
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The real server binary, run as a child process on loopback with its data
/// directory in a temporary directory.  Killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct ServerProcess {
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
    addr: SocketAddr,
    env: Vec<(String, String)>,
    umask: Option<String>,
}

impl ServerProcess {
    /// Starts `bin` (the `quicnprotochat-server` executable) on a free port.
    pub fn start(bin: impl AsRef<Path>) -> Result<Self, HarnessError> {
        Self::start_with(bin, tempfile::tempdir()?, &[], None)
    }

    /// Like [`ServerProcess::start`], with the temporary directory (and so
    /// the data directory) under `parent`, e.g. on a small file system.
    pub fn start_in(bin: impl AsRef<Path>, parent: &Path) -> Result<Self, HarnessError> {
        Self::start_with(bin, tempfile::tempdir_in(parent)?, &[], None)
    }

    /// Starts `bin` with these environment variables added (settings such
    /// as `QUICNPROTOCHAT_DRAIN_TIMEOUT_SECS`); they apply to restarts too.
    pub fn start_with_env(
        bin: impl AsRef<Path>,
        env: &[(&str, &str)],
    ) -> Result<Self, HarnessError> {
        Self::start_with(bin, tempfile::tempdir()?, env, None)
    }

    /// Starts `bin` under the file-creation mask `umask` (octal, e.g.
    /// `000`), set by `/bin/sh` before it executes the server.
    pub fn start_with_umask(bin: impl AsRef<Path>, umask: &str) -> Result<Self, HarnessError> {
        Self::start_with(bin, tempfile::tempdir()?, &[], Some(umask))
    }

    fn start_with(
        bin: impl AsRef<Path>,
        dir: tempfile::TempDir,
        env: &[(&str, &str)],
        umask: Option<&str>,
    ) -> Result<Self, HarnessError> {
        install_crypto_provider();
        let mut p = Self {
            bin: bin.as_ref().to_path_buf(),
            dir,
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            umask: umask.map(str::to_string),
        };
        p.spawn()?;
        Ok(p)
    }

    /// Sets `name` to `value` in the environment of later starts and of
    /// [`ServerProcess::command`] (replacing an earlier value), e.g. a new
    /// database key after a re-key.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_string(), value.to_string()));
    }

    /// The temporary directory holding the data directory and the log (for
    /// other files a test writes, such as key files).
    pub fn temp_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server command with this instance's environment (for tests that
    /// run other subcommands, e.g. `health`).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env("QUICNPROTOCHAT_DATA_DIR", self.data_dir())
            .env("QUICNPROTOCHAT_AUTH_TOKEN", TEST_TOKEN)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn spawn(&mut self) -> Result<(), HarnessError> {
        let mut cmd = self.command();
        if let Some(umask) = &self.umask {
            let bin = std::mem::replace(&mut cmd, Command::new("/bin/sh"));
            cmd.env_clear()
                .envs(bin.get_envs().filter_map(|(k, v)| Some((k, v?))))
                .args(["-c", "umask \"$0\" && exec \"$@\"", umask])
                .arg(&self.bin);
        }
        let mut child = cmd
            .args(["serve", "--listen", &self.addr.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| HarnessError::Process("no stderr".into()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Every start appends to one log beside the data directory.
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
                if line.contains("listening")
                    && let Some(rest) = line.split("addr=").nth(1)
                {
                    let _ = tx.send(
                        rest.split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_string(),
                    );
                }
            }
        });
        self.child = Some(child);
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| HarnessError::Process("the server did not report its address".into()))?;
        self.addr = addr
            .parse()
            .map_err(|_| HarnessError::Process(format!("bad address {addr}")))?;
        Ok(())
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's log (standard error of every start, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// SHA-256 fingerprint of the server's development certificate.
    pub fn fingerprint(&self) -> Result<[u8; 32], HarnessError> {
        use quicnprotochat_proto::rustls::pki_types::CertificateDer;
        use quicnprotochat_proto::rustls::pki_types::pem::PemObject as _;
        let cert = CertificateDer::from_pem_file(self.data_dir().join("dev-cert.pem"))
            .map_err(|e| HarnessError::Process(format!("reading the certificate: {e}")))?;
        Ok(transport::fingerprint(&cert))
    }

    /// A client configuration pinning this server.
    pub fn client_config(&self) -> Result<ClientConfig, HarnessError> {
        Ok(ClientConfig::new(
            self.addr,
            ServerAuth::Pinned(self.fingerprint()?),
            TEST_TOKEN,
        ))
    }

    /// Whether the server process is still running (false once killed or
    /// after it exited by itself).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the server with SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends the signal `name` (`TERM`, `INT`, …) to the server process,
    /// through the system's `kill` command.
    pub fn signal(&self, name: &str) -> Result<(), HarnessError> {
        let child = self.child.as_ref().ok_or(HarnessError::Stopped)?;
        let status = Command::new("kill")
            .args(["-s", name, &child.id().to_string()])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(HarnessError::Process(format!(
                "kill -s {name} failed: {status}"
            )))
        }
    }

    /// Waits up to `within` for the server process to exit and returns its
    /// status; `None` if it still runs then (it is left running).
    pub fn wait_exit(
        &mut self,
        within: Duration,
    ) -> Result<Option<std::process::ExitStatus>, HarnessError> {
        const POLL: Duration = Duration::from_millis(20);
        let child = self.child.as_mut().ok_or(HarnessError::Stopped)?;
        // No portable way to wait for a child with a deadline: poll, at
        // most `within` worth of times.
        let polls = within.as_millis() / POLL.as_millis() + 1;
        for _ in 0..polls {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(Some(status));
            }
            std::thread::sleep(POLL);
        }
        Ok(None)
    }

    /// Kills and starts the server again on the same data directory and port.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill();
        self.spawn()
    }

    /// A registered messenger (new profile) for `username`.
    pub async fn messenger(&self, username: &str) -> Result<Messenger, HarnessError> {
        register_messenger(self.dir.path(), self.client_config()?, username).await
    }

    /// Reopens the profile of `username` (a client restart).
    pub async fn reopen_messenger(&self, username: &str) -> Result<Messenger, HarnessError> {
        reopen_messenger(self.dir.path(), username).await
    }

    /// A registered messenger (new profile) for `username` that connects
    /// with `config` (other nodes, fallbacks).
    pub async fn messenger_with(
        &self,
        username: &str,
        config: ClientConfig,
    ) -> Result<Messenger, HarnessError> {
        register_messenger(self.dir.path(), config, username).await
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A UDP relay on loopback between clients and a server that can be told
/// to go dead after a number of datagrams (both directions counted): a
/// connection cut at a chosen point of a conversation, without touching
/// either end.  Each client address gets its own upstream socket; a
/// connection that comes after [`UdpRelay::heal`] goes through again.
#[derive(Debug)]
pub struct UdpRelay {
    addr: SocketAddr,
    state: std::sync::Arc<RelayState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct RelayState {
    /// datagrams seen since the last [`UdpRelay::cut_after`]
    seen: std::sync::atomic::AtomicU64,
    /// datagrams forwarded before the relay goes dead
    limit: std::sync::atomic::AtomicU64,
    stop: std::sync::atomic::AtomicBool,
}

/// How often relay threads look at the stop flag.
const RELAY_POLL: Duration = Duration::from_millis(50);

impl RelayState {
    /// Counts a datagram; whether it may pass.
    fn pass(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.seen.fetch_add(1, SeqCst) < self.limit.load(SeqCst)
    }

    fn stopped(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl UdpRelay {
    /// A relay on a free loopback port forwarding to `server`.
    pub fn start(server: SocketAddr) -> Result<Self, HarnessError> {
        use std::net::UdpSocket;
        let front = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        front.set_read_timeout(Some(RELAY_POLL))?;
        let addr = front.local_addr()?;
        let state = std::sync::Arc::new(RelayState {
            seen: 0.into(),
            limit: u64::MAX.into(),
            stop: false.into(),
        });
        let shared = state.clone();
        let thread = std::thread::spawn(move || relay_front(front, server, shared));
        Ok(Self {
            addr,
            state,
            thread: Some(thread),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts counting again; after `n` more datagrams nothing passes.
    pub fn cut_after(&self, n: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        self.state.limit.store(0, SeqCst);
        self.state.seen.store(0, SeqCst);
        self.state.limit.store(n, SeqCst);
    }

    /// Lets everything pass again, counting from zero.
    pub fn heal(&self) {
        self.cut_after(u64::MAX);
    }

    /// Datagrams seen (passed or dropped) since the last cut or heal.
    pub fn seen(&self) -> u64 {
        self.state.seen.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.state
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads what clients send and forwards it upstream, one upstream socket
/// (and reader thread) per client address.
fn relay_front(front: std::net::UdpSocket, server: SocketAddr, state: std::sync::Arc<RelayState>) {
    use std::collections::HashMap;
    use std::net::UdpSocket;
    let front = std::sync::Arc::new(front);
    let mut upstream: HashMap<SocketAddr, std::sync::Arc<UdpSocket>> = HashMap::new();
    let mut readers = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while !state.stopped() {
        let Ok((n, client)) = front.recv_from(&mut buf) else {
            continue;
        };
        let up = match upstream.get(&client) {
            Some(up) => up.clone(),
            None => {
                let Ok(sock) = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0))) else {
                    continue;
                };
                if sock.connect(server).is_err() || sock.set_read_timeout(Some(RELAY_POLL)).is_err()
                {
                    continue;
                }
                let sock = std::sync::Arc::new(sock);
                let (back, front2, shared) = (sock.clone(), front.clone(), state.clone());
                readers.push(std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65_536];
                    while !shared.stopped() {
                        if let Ok(n) = back.recv(&mut buf)
                            && shared.pass()
                        {
                            let _ = front2.send_to(&buf[..n], client);
                        }
                    }
                }));
                upstream.insert(client, sock.clone());
                sock
            }
        };
        if state.pass() {
            let _ = up.send(&buf[..n]);
        }
    }
    for r in readers {
        let _ = r.join();
    }
}
