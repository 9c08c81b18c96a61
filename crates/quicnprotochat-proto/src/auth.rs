//! The authentication transcript.
//!
//! The client proves possession of its Ed25519 identity key by signing
//!
//! ```text
//! TRANSCRIPT_LABEL || nonce (32) || exporter (32) || identity key (32)
//! ```
//!
//! where `nonce` is the server's answer to `Service.challenge` and `exporter`
//! is 32 bytes of TLS keying material exported from this QUIC connection
//! (RFC 8446 §7.5, RFC 5705) with label [`EXPORTER_LABEL`] and an empty
//! context.  The exporter binds the proof to this TLS session: a captured
//! proof is useless on any other connection, and the nonce makes it single-use
//! on this one.

use crate::limits::{KEY_LEN, NONCE_LEN};

/// Domain-separation prefix of the signed transcript.  It cannot collide with
/// an MLS signature input, which starts with a TLS length prefix.
pub const TRANSCRIPT_LABEL: &[u8] = b"quicnprotochat auth v1\0";

/// TLS exporter label (RFC 5705 labels are free-form ASCII).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-quicnprotochat-auth-v1";

/// Length of the exported keying material.
pub const EXPORTER_LEN: usize = 32;

/// Builds the exact bytes the client signs and the server verifies.
pub fn transcript(
    nonce: &[u8; NONCE_LEN],
    exporter: &[u8; EXPORTER_LEN],
    identity_key: &[u8; KEY_LEN],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(TRANSCRIPT_LABEL.len() + NONCE_LEN + EXPORTER_LEN + KEY_LEN);
    out.extend_from_slice(TRANSCRIPT_LABEL);
    out.extend_from_slice(nonce);
    out.extend_from_slice(exporter);
    out.extend_from_slice(identity_key);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vector: the transcript layout is part of the wire contract.
    #[test]
    fn transcript_layout_is_stable() {
        let t = transcript(&[1; 32], &[2; 32], &[3; 32]);
        assert_eq!(&t[..TRANSCRIPT_LABEL.len()], b"quicnprotochat auth v1\0");
        let rest = &t[TRANSCRIPT_LABEL.len()..];
        assert_eq!(rest.len(), 96);
        assert!(rest[..32].iter().all(|b| *b == 1));
        assert!(rest[32..64].iter().all(|b| *b == 2));
        assert!(rest[64..].iter().all(|b| *b == 3));
    }
}
