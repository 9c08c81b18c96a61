//! quicnprotochat client library.
//!
//! [`Client`] connects to a delivery server over QUIC, authenticates an
//! identity and exposes every server operation as a `Send` future.  The
//! Cap'n Proto RPC session (which is single-threaded) lives on a worker thread
//! of its own; the handle talks to it over channels, so a `Client` can be used
//! from any tokio runtime and shared between tasks.

mod connection;
pub mod display;
mod error;
#[cfg(feature = "test-harness")]
pub mod harness;
mod messenger;
pub mod tui;
mod types;

pub use connection::{Client, IdleSession, RATE_LIMIT_PATIENCE, Subscription};
pub use error::{ClientError, ServerErrorCode};
pub use messenger::{EventStream, Messenger, MessengerError, P2pOptions};
pub use quicnprotochat_core::{Event, FileInfo, FileStatus, ProfileKey};
pub use quicnprotochat_proto::transport::ServerAuth;
pub use types::{
    AuthChallenge, ClientConfig, EnqueueResult, Envelope, Fetched, Health, OutgoingMessage,
};
