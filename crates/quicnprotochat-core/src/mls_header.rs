//! Reading the cleartext header of MLS messages (RFC 9420 §6): what the delivery
//! service may know about a payload.  A `PrivateMessage` exposes its group id,
//! epoch and content type in the clear; the server uses them to accept at
//! most one commit per group epoch.  Nothing here decrypts anything.
//! (Not to be confused with `quicnprotochat_proto::framing`, the bounded
//! Cap'n Proto stream framing of the RPC transport.)

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{ContentType, MlsMessageBodyIn, MlsMessageIn};

/// What kind of MLS message a payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// an application message
    Application,
    /// a proposal
    Proposal,
    /// a commit
    Commit,
    /// a Welcome
    Welcome,
    /// anything else (key package, group info, not MLS at all)
    Other,
}

/// The cleartext routing facts of an MLS message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameInfo {
    /// message kind
    pub kind: FrameKind,
    /// group id, for handshake and application messages
    pub group_id: Option<Vec<u8>>,
    /// epoch the message was sent in
    pub epoch: Option<u64>,
}

/// Parses the cleartext framing of `bytes`.  Never fails: bytes that are not
/// an MLS message are [`FrameKind::Other`].
pub fn inspect(bytes: &[u8]) -> FrameInfo {
    let other = FrameInfo {
        kind: FrameKind::Other,
        group_id: None,
        epoch: None,
    };
    let Ok(msg) = MlsMessageIn::tls_deserialize_exact(bytes) else {
        return other;
    };
    match msg.extract() {
        MlsMessageBodyIn::Welcome(_) => FrameInfo {
            kind: FrameKind::Welcome,
            group_id: None,
            epoch: None,
        },
        body @ (MlsMessageBodyIn::PrivateMessage(_) | MlsMessageBodyIn::PublicMessage(_)) => {
            let pm = match body {
                MlsMessageBodyIn::PrivateMessage(m) => openmls::prelude::ProtocolMessage::from(m),
                MlsMessageBodyIn::PublicMessage(m) => openmls::prelude::ProtocolMessage::from(m),
                _ => return other,
            };
            let kind = match pm.content_type() {
                ContentType::Application => FrameKind::Application,
                ContentType::Proposal => FrameKind::Proposal,
                ContentType::Commit => FrameKind::Commit,
            };
            FrameInfo {
                kind,
                group_id: Some(pm.group_id().as_slice().to_vec()),
                epoch: Some(pm.epoch().as_u64()),
            }
        }
        _ => other,
    }
}
