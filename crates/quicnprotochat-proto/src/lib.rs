//! The quicnprotochat wire contract.
//!
//! This crate is the only one that depends on Cap'n Proto: it carries the schema's
//! generated code (checked in under `src/generated/`, kept fresh by the
//! `generated_code_is_fresh` test), the QUIC ALPN, the wire version, the
//! protocol limits every peer must respect, the authentication transcript,
//! and the plumbing that runs an RPC session over a QUIC stream with bounded
//! framing.  Other crates reach Cap'n Proto only through the re-exports here,
//! and each only in one adapter module (the server's `rpc.rs`, the client's
//! `connection.rs`; the server's tidy test enforces it).

pub mod auth;
pub mod framing;
pub mod limits;
pub mod rpc;
pub mod transport;

pub use capnp;
pub use capnp_rpc;
pub use quinn;
pub use rustls;

/// Generated Cap'n Proto code for `schemas/quicnprotochat.capnp`.
pub mod schema {
    // Generated code trips these lints; the allowance is scoped to this module only.
    #[allow(
        clippy::all,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unimplemented,
        missing_debug_implementations,
        unused_qualifications,
        dead_code
    )]
    #[rustfmt::skip]
    pub mod quicnprotochat_capnp {
        include!("generated/quicnprotochat_capnp.rs");
    }
    pub use quicnprotochat_capnp::*;
}

/// QUIC ALPN: names the protocol and its major wire version.
///
/// A peer with another major version fails the TLS handshake with
/// `no_application_protocol` instead of hanging.
pub const ALPN: &[u8] = b"quicnprotochat/1";

/// Minor wire version, exchanged in `Service.challenge` and `AuthRequest`.
pub const WIRE_VERSION: u16 = schema::WIRE_VERSION;

/// Server software version reported by `Service.health`.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");
