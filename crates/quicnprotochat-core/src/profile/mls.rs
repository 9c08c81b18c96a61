//! Small helpers over openmls values: who a member is, and a message to
//! send.

use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::{BasicCredential, Credential, Member, MlsGroup, MlsMessageOut};

use crate::group::{GroupError, Outgoing};
use crate::identity::IdentityKey;

/// The username in a basic credential (`<unknown>` for others).
pub(super) fn username_of(c: &Credential) -> String {
    BasicCredential::try_from(c.clone())
        .ok()
        .and_then(|b| String::from_utf8(b.identity().to_vec()).ok())
        .unwrap_or_else(|| "<unknown>".into())
}

/// A member's signature key is a strong Ed25519 identity key.
pub(super) fn check_member_key(key: &[u8]) -> Result<(), GroupError> {
    IdentityKey::from_slice(key)
        .and_then(|k| k.check())
        .map_err(|_| GroupError::WeakMemberKey)
}

/// A member's identity key, if its signature key is one.
pub(super) fn member_key(m: &Member) -> Option<IdentityKey> {
    IdentityKey::from_slice(&m.signature_key).ok()
}

/// Identity keys of the members of `group` other than `me`.
pub(super) fn others(group: &MlsGroup, me: IdentityKey) -> Vec<IdentityKey> {
    group
        .members()
        .filter_map(|m| member_key(&m))
        .filter(|k| *k != me)
        .collect()
}

/// `message` for delivery to `recipients` under delivery id `message_id`.
pub(super) fn outgoing(
    recipients: Vec<IdentityKey>,
    message_id: [u8; 16],
    message: &MlsMessageOut,
) -> Result<Outgoing, GroupError> {
    Ok(Outgoing {
        recipients,
        message_id,
        payload: message.tls_serialize_detached().map_err(GroupError::mls)?,
    })
}
