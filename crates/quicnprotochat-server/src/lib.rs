//! The quicnprotochat delivery service.
//!
//! The server hands out MLS key packages and stores opaque ciphertext in
//! per-recipient queues.  **Architecture invariant:** it never sees message
//! plaintext or private keys; everything from the network is
//! attacker-controlled and gets a typed error, never a panic.
//!
//! Entry points: [`server::Server`] (`bind` + `serve`) and [`server::spawn`].

pub mod admin;
pub mod config;
mod delivery;
mod drain;
pub mod error;
pub mod health;
mod http;
mod hub;
pub mod lock;
pub mod maintenance;
pub mod metrics;
pub mod production;
mod ratelimit;
mod rpc;
pub mod server;
pub mod store;
pub mod tokens;

pub use config::Config;
pub use error::ServerError;
pub use server::{Server, ServerHandle, spawn};
