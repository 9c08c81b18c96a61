//! Target `app_message`: the JSON application message inside an MLS
//! application message, the peer address it may announce, and the file it
//! may carry (the receiver's checks and the name it is saved under).

use quicnprotochat_core::PeerInfo;
use quicnprotochat_core::file::{self, MAX_NAME_BYTES};
use quicnprotochat_core::message::{AppMessage, Content};

/// Decodes; what decodes must encode and decode to itself.
pub fn check(data: &[u8]) {
    let Ok(msg) = AppMessage::decode(data) else {
        return;
    };
    let bytes = msg.encode().expect("a decoded message encodes");
    let again = AppMessage::decode(&bytes).expect("an encoded message decodes");
    assert_eq!(again, msg);
    if let Content::PeerAddress {
        endpoint_id,
        addrs,
        relay_url,
    } = &msg.content
    {
        let _ = PeerInfo::from_content(endpoint_id, addrs, relay_url.as_deref());
    }
    if let Content::File {
        name,
        media_type,
        size,
        sha256,
        content,
    } = &msg.content
    {
        let _ = file::check(*size, sha256, &content.0);
        let _ = file::sanitize_media_type(media_type);
        let safe = file::sanitize_name(name);
        assert!(!safe.is_empty() && safe.len() <= MAX_NAME_BYTES, "{safe:?}");
        assert!(
            !safe.contains(['/', '\\']) && !safe.starts_with('.'),
            "{safe:?}"
        );
        assert!(!safe.chars().any(char::is_control), "{safe:?}");
        assert_eq!(
            file::sanitize_name(&safe),
            safe,
            "a safe name stays as it is"
        );
    }
}
