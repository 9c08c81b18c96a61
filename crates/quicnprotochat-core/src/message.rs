//! The application message format: what travels inside MLS application
//! messages.
//!
//! Version 1 is a JSON object: `{"v":1,"id":"<32 hex>","ts":<unix ms>,
//! "content":{"type":"text","text":"..."}}`.  The sender is not in the body:
//! it is the MLS-authenticated sender of the message.  Unknown content types
//! decode to [`Content::Unsupported`] so older clients keep working when new
//! types appear.
//!
//! A file travels whole in one message, its content in base64
//! ([`Content::File`]); what a receiver checks before it writes one is in
//! [`crate::file`].

use serde::{Deserialize, Serialize};

use crate::file::MAX_FILE_BYTES;

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
    /// a file to send is over the limit
    #[error("the file is {0} bytes; files are limited to 512 KiB ({MAX_FILE_BYTES} bytes)")]
    FileTooLarge(usize),
}

/// File content: raw bytes in memory, base64 on the wire (RFC 4648
/// section 4, padded; decoding refuses anything else).  Its `Debug` shows
/// the length only, so a file's content never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct FileContent(pub Vec<u8>);

impl std::fmt::Debug for FileContent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileContent(<{} bytes>)", self.0.len())
    }
}

impl Serialize for FileContent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::base64::encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for FileContent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = FileContent;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("base64 text")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FileContent, E> {
                crate::base64::decode(v)
                    .map(FileContent)
                    .ok_or_else(|| E::custom("file content is not canonical base64"))
            }
        }
        d.deserialize_str(Visitor)
    }
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
    /// a file, whole; the receiver checks it ([`crate::file::check`]) and
    /// makes its name safe ([`crate::file::sanitize_name`]) before it
    /// writes anything
    File {
        /// the file's name (its base name, as the sender has it)
        name: String,
        /// its media type, `type/subtype`
        media_type: String,
        /// its size in bytes: the content's length
        size: u64,
        /// SHA-256 of the content, 64 lowercase hex characters
        sha256: String,
        /// the content, at most [`MAX_FILE_BYTES`]
        content: FileContent,
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

    /// A file named `name` (a base name) of type `media_type`: refused over
    /// [`MAX_FILE_BYTES`].
    pub fn file(
        id: [u8; 16],
        ts: u64,
        name: &str,
        media_type: &str,
        content: Vec<u8>,
    ) -> Result<Self, MessageError> {
        if content.len() > MAX_FILE_BYTES {
            return Err(MessageError::FileTooLarge(content.len()));
        }
        Ok(Self {
            v: FORMAT_VERSION,
            id: hex::encode(id),
            ts,
            content: Content::File {
                name: name.into(),
                media_type: media_type.into(),
                size: u64::try_from(content.len()).unwrap_or(u64::MAX),
                sha256: crate::file::sha256_hex(&content),
                content: FileContent(content),
            },
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
    fn files_carry_their_content_in_base64_with_size_and_hash() {
        let m = AppMessage::file([0xab; 16], 7, "hi.txt", "text/plain", b"hello".to_vec()).unwrap();
        let bytes = m.encode().unwrap();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            format!(
                r#"{{"v":1,"id":"{}","ts":7,"content":{{"type":"file","name":"hi.txt","media_type":"text/plain","size":5,"sha256":"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824","content":"aGVsbG8="}}}}"#,
                "ab".repeat(16)
            )
        );
        assert_eq!(AppMessage::decode(&bytes).unwrap(), m);
        // The content never shows in a debug print.
        let debug = format!("{m:?}");
        assert!(debug.contains("FileContent(<5 bytes>)"), "{debug}");
        assert!(!debug.contains("104, 101"), "{debug}");

        let max = AppMessage::file([1; 16], 1, "big", "a/b", vec![7; MAX_FILE_BYTES]).unwrap();
        let encoded = max.encode().unwrap();
        assert!(encoded.len() < 700 * 1024, "{}", encoded.len());
        assert_eq!(AppMessage::decode(&encoded).unwrap(), max);
        assert!(matches!(
            AppMessage::file([1; 16], 1, "big", "a/b", vec![7; MAX_FILE_BYTES + 1]),
            Err(MessageError::FileTooLarge(n)) if n == MAX_FILE_BYTES + 1
        ));
    }

    #[test]
    fn file_content_that_is_not_canonical_base64_is_malformed() {
        for content in ["aGVsbG8", "aGVsbG9=", "aGVs bG8=", "!!!!", "[104]"] {
            let raw = format!(
                r#"{{"v":1,"id":"{}","ts":7,"content":{{"type":"file","name":"a","media_type":"a/b","size":5,"sha256":"00","content":"{content}"}}}}"#,
                "ab".repeat(16)
            );
            assert!(
                matches!(
                    AppMessage::decode(raw.as_bytes()),
                    Err(MessageError::Malformed(_))
                ),
                "{content}"
            );
        }
        // An array of numbers is not base64 either.
        let raw = format!(
            r#"{{"v":1,"id":"{}","ts":7,"content":{{"type":"file","name":"a","media_type":"a/b","size":1,"sha256":"00","content":[104]}}}}"#,
            "ab".repeat(16)
        );
        assert!(AppMessage::decode(raw.as_bytes()).is_err());
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
