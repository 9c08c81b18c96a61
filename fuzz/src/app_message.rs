//! Target `app_message`: the JSON application message inside an MLS
//! application message, and the peer address it may announce.

use quicnprotochat_core::PeerInfo;
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
}
