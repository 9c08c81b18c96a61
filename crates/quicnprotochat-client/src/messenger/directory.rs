//! Directory checks: the server's directory binds usernames to identity
//! keys, and group members' credentials claim usernames.  An invitee's key
//! package must name the user the directory resolved, and members whose
//! credential the directory contradicts are reported, so members see who
//! they think they see.

use quicnprotochat_core::{GroupError, IdentityKey, MemberInfo};

use super::error::MessengerError;
use crate::connection::Client;
use crate::error::{ClientError, ServerErrorCode};

/// Resolves `username` and claims one of their key packages, checking that
/// its credential names the same user and key.  Returns the invitee's key
/// and the key package.
pub(super) async fn claim_invitee(
    client: &Client,
    username: &str,
) -> Result<(IdentityKey, Vec<u8>), MessengerError> {
    let invitee = not_found_as(client.resolve(username).await, || {
        MessengerError::NoSuchUser(username.to_string())
    })?;
    let (kp, _last_resort) = not_found_as(client.fetch_key_package(invitee).await, || {
        MessengerError::NoKeyPackage(username.to_string())
    })?;
    // The directory (server) binds username and key; the key package's
    // credential must claim the same name, so members see who they think.
    let info = quicnprotochat_core::keypackage::inspect(&kp)?;
    if info.identity != invitee || info.username.as_deref() != Some(username) {
        return Err(GroupError::WrongInvitee.into());
    }
    Ok((invitee, kp))
}

/// The identity key the directory binds to `username`.
pub(super) async fn resolve(
    client: &Client,
    username: &str,
) -> Result<IdentityKey, MessengerError> {
    not_found_as(client.resolve(username).await, || {
        MessengerError::NoSuchUser(username.to_string())
    })
}

/// The `members` (other than ourselves) whose credential names a user the
/// directory binds to another key, or does not know.
pub(super) async fn mismatches(
    client: &Client,
    members: Vec<MemberInfo>,
) -> Result<Vec<MemberInfo>, MessengerError> {
    let mut mismatches = Vec::new();
    for m in members.into_iter().filter(|m| !m.is_self) {
        match client.resolve(&m.username).await {
            Ok(key) if key == m.key => {}
            Ok(_) => mismatches.push(m),
            Err(e) if e.server_code() == Some(ServerErrorCode::NotFound) => mismatches.push(m),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(mismatches)
}

/// `result`, with the server's `NotFound` turned into `missing()`.
fn not_found_as<T>(
    result: Result<T, ClientError>,
    missing: impl FnOnce() -> MessengerError,
) -> Result<T, MessengerError> {
    match result {
        Err(e) if e.server_code() == Some(ServerErrorCode::NotFound) => Err(missing()),
        r => Ok(r?),
    }
}
