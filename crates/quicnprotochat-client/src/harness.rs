//! Shared test harness (feature `test-harness`), used by every crate's
//! integration tests: installs the rustls ring provider once per process,
//! starts a real server on port 0 in a temporary data directory, and creates
//! authenticated, registered clients.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Once;

use quicnprotochat_core::Identity;
use quicnprotochat_proto::transport::{self, ServerAuth};
use quicnprotochat_server::config::{Config, Secret};
use quicnprotochat_server::{ServerError, ServerHandle};

use crate::{Client, ClientConfig, ClientError};

/// The access token of test servers (not a development default, never in docs).
pub const TEST_TOKEN: &str = "harness-token-0123456789abcdef0123456789";

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
