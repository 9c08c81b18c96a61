//! The application message format: what travels inside MLS application
//! messages.
//!
//! Version 1 is a JSON object: `{"v":1,"id":"<32 hex>","ts":<unix ms>,
//! "content":{"type":"text","text":"..."}}`.  The sender is not in the body:
//! it is the MLS-authenticated sender of the message.  Unknown content types
//! decode to [`Content::Unsupported`] so older clients keep working when new
//! types appear.

use serde::{Deserialize, Serialize};

/// Most addresses in one peer-address announcement.
pub const MAX_PEER_ADDRS: usize = 16;

/// Length of a delivery token (protocol section 9.10).
pub const DELIVERY_TOKEN_LEN: usize = 32;

/// How to reach a member directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// iroh endpoint id
    pub endpoint_id: [u8; 32],
    /// socket addresses
    pub addrs: Vec<std::net::SocketAddr>,
    /// relay URL
    pub relay_url: Option<String>,
}

impl PeerInfo {
    /// Validates an announced address (attacker-controlled input).
    pub fn from_content(
        endpoint_id: &str,
        addrs: &[String],
        relay_url: Option<&str>,
    ) -> Result<Self, MessageError> {
        let id: [u8; 32] = hex::decode(endpoint_id)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| MessageError::Malformed("bad endpoint id".into()))?;
        if addrs.len() > MAX_PEER_ADDRS {
            return Err(MessageError::Malformed("too many peer addresses".into()));
        }
        let addrs = addrs
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|_| MessageError::Malformed("bad peer address".into()))
            })
            .collect::<Result<_, _>>()?;
        if relay_url.is_some_and(|u| u.len() > 512) {
            return Err(MessageError::Malformed("relay URL too long".into()));
        }
        Ok(Self {
            endpoint_id: id,
            addrs,
            relay_url: relay_url.map(str::to_string),
        })
    }
}

/// Current format version.
pub const FORMAT_VERSION: u8 = 1;

/// Longest text accepted in one message (characters are UTF-8 bytes here).
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// Errors decoding or encoding application messages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// not valid JSON of this format
    #[error("malformed application message: {0}")]
    Malformed(String),
    /// a version this client does not understand
    #[error("unsupported application message version {0}")]
    Version(u8),
    /// text too long
    #[error("text longer than {MAX_TEXT_BYTES} bytes")]
    TooLong,
}

/// Message content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Content {
    /// plain text
    Text {
        /// the text
        text: String,
    },
    /// how to reach the sender directly (peer-to-peer), announced inside the
    /// group so the server never learns it
    PeerAddress {
        /// iroh endpoint id, 64 hex characters
        endpoint_id: String,
        /// socket addresses (`ip:port`), at most 16
        addrs: Vec<String>,
        /// relay URL, if the sender uses one
        #[serde(default, skip_serializing_if = "Option::is_none")]
        relay_url: Option<String>,
    },
    /// the sender's delivery token: what lets the server tell the group's
    /// messages to the sender from a stranger's (protocol section 9.10);
    /// only the server-side hash of it is ever seen outside the group
    DeliveryToken {
        /// the token, 64 hex characters
        token: String,
    },
    /// a content type this client does not know
    #[serde(other)]
    Unsupported,
}

/// An application message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppMessage {
    /// format version
    pub v: u8,
    /// sender-chosen random id (hex of 16 bytes); also the delivery message id
    pub id: String,
    /// sender's clock, Unix milliseconds
    pub ts: u64,
    /// the content
    pub content: Content,
}

impl AppMessage {
    /// A text message.
    pub fn text(id: [u8; 16], ts: u64, text: &str) -> Result<Self, MessageError> {
        if text.len() > MAX_TEXT_BYTES {
            return Err(MessageError::TooLong);
        }
        Ok(Self {
            v: FORMAT_VERSION,
            id: hex::encode(id),
            ts,
            content: Content::Text { text: text.into() },
        })
    }

    /// A peer-address announcement.
    pub fn peer_address(id: [u8; 16], ts: u64, peer: &PeerInfo) -> Self {
        Self {
            v: FORMAT_VERSION,
            id: hex::encode(id),
            ts,
            content: Content::PeerAddress {
                endpoint_id: hex::encode(peer.endpoint_id),
                addrs: peer.addrs.iter().map(ToString::to_string).collect(),
                relay_url: peer.relay_url.clone(),
            },
        }
    }

    /// A delivery-token announcement.
    pub fn delivery_token(id: [u8; 16], ts: u64, token: &[u8; DELIVERY_TOKEN_LEN]) -> Self {
        Self {
            v: FORMAT_VERSION,
            id: hex::encode(id),
            ts,
            content: Content::DeliveryToken {
                token: hex::encode(token),
            },
        }
    }

    /// Serializes the message.
    pub fn encode(&self) -> Result<Vec<u8>, MessageError> {
        serde_json::to_vec(self).map_err(|e| MessageError::Malformed(e.to_string()))
    }

    /// Parses a message from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        let m: Self =
            serde_json::from_slice(bytes).map_err(|e| MessageError::Malformed(e.to_string()))?;
        if m.v != FORMAT_VERSION {
            return Err(MessageError::Version(m.v));
        }
        if m.id.len() != 32 || hex::decode(&m.id).is_err() {
            return Err(MessageError::Malformed("bad message id".into()));
        }
        if let Content::Text { text } = &m.content
            && text.len() > MAX_TEXT_BYTES
        {
            return Err(MessageError::TooLong);
        }
        if let Content::DeliveryToken { token } = &m.content {
            token_from_hex(token)?;
        }
        Ok(m)
    }
}

/// A delivery token from its announced hex form.
pub fn token_from_hex(token: &str) -> Result<[u8; DELIVERY_TOKEN_LEN], MessageError> {
    hex::decode(token)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| MessageError::Malformed("bad delivery token".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer_encoding() {
        let m = AppMessage::text([0xab; 16], 1_700_000_000_000, "hi").unwrap();
        let bytes = m.encode().unwrap();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            r#"{"v":1,"id":"abababababababababababababababab","ts":1700000000000,"content":{"type":"text","text":"hi"}}"#
        );
        assert_eq!(AppMessage::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn peer_addresses_round_trip_and_are_validated() {
        let peer = PeerInfo {
            endpoint_id: [9; 32],
            addrs: vec!["127.0.0.1:4000".parse().unwrap()],
            relay_url: None,
        };
        let m = AppMessage::peer_address([1; 16], 5, &peer);
        let back = AppMessage::decode(&m.encode().unwrap()).unwrap();
        let Content::PeerAddress {
            endpoint_id,
            addrs,
            relay_url,
        } = back.content
        else {
            panic!("wrong content")
        };
        assert_eq!(
            PeerInfo::from_content(&endpoint_id, &addrs, relay_url.as_deref()).unwrap(),
            peer
        );
        assert!(PeerInfo::from_content("zz", &[], None).is_err());
        assert!(
            PeerInfo::from_content(&"ab".repeat(32), &["not an address".into()], None).is_err()
        );
        assert!(
            PeerInfo::from_content(&"ab".repeat(32), &vec!["1.2.3.4:5".into(); 17], None).is_err()
        );
    }

    #[test]
    fn delivery_tokens_round_trip_and_are_validated() {
        let m = AppMessage::delivery_token([1; 16], 5, &[0xcd; 32]);
        let bytes = m.encode().unwrap();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            format!(
                r#"{{"v":1,"id":"{}","ts":5,"content":{{"type":"delivery_token","token":"{}"}}}}"#,
                "01".repeat(16),
                "cd".repeat(32)
            )
        );
        assert_eq!(AppMessage::decode(&bytes).unwrap(), m);
        for bad in ["", "zz", &"ab".repeat(31), &"ab".repeat(33)] {
            let raw = format!(
                r#"{{"v":1,"id":"{}","ts":5,"content":{{"type":"delivery_token","token":"{bad}"}}}}"#,
                "01".repeat(16)
            );
            assert!(AppMessage::decode(raw.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_content_types_decode_as_unsupported() {
        let raw = br#"{"v":1,"id":"abababababababababababababababab","ts":1,"content":{"type":"sticker","url":"x"}}"#;
        assert_eq!(
            AppMessage::decode(raw).unwrap().content,
            Content::Unsupported
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(AppMessage::decode(b"").is_err());
        assert!(AppMessage::decode(b"\xff\x00").is_err());
        assert!(matches!(
            AppMessage::decode(br#"{"v":2,"id":"abababababababababababababababab","ts":1,"content":{"type":"text","text":"x"}}"#),
            Err(MessageError::Version(2))
        ));
        assert!(
            AppMessage::decode(br#"{"v":1,"id":"zz","ts":1,"content":{"type":"text","text":"x"}}"#)
                .is_err()
        );
    }
}
