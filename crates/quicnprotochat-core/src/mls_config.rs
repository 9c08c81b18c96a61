//! The MLS settings every group and key package of this client uses: the
//! ciphersuite ([`crate::CIPHERSUITE`]), the leaf capabilities, the
//! group-name extension and how many past epochs stay readable.
//!
//! Key packages ([`crate::keypackage`]) and groups ([`crate::profile`]) both
//! build on this module, which depends on neither.

use openmls::prelude::{
    Capabilities, Extension, ExtensionType, Extensions, InvalidExtensionError,
    MlsGroupCreateConfig, MlsGroupJoinConfig, UnknownExtension,
};

use crate::CIPHERSUITE;

/// Private-use extension type (RFC 9420 §17.3, 0xF000-0xFFFF) carrying the
/// group's display name in the group context, so invitees learn it from the
/// Welcome (encrypted to them) and the server never does.
pub const GROUP_META_EXTENSION: u16 = 0xF0A1;

/// Epochs of old keys kept to decrypt application messages that were sent
/// just before a commit but arrive after it.  Small, to limit how long old
/// keys live (forward secrecy).
pub const MAX_PAST_EPOCHS: usize = 3;

/// The capabilities of our leaves: the last-resort key-package extension and
/// the group-name extension, on top of what openmls always supports.  Public
/// for tests and tools that must build leaves the way this client does.
pub fn capabilities() -> Capabilities {
    Capabilities::new(
        None,
        None,
        Some(&[
            ExtensionType::LastResort,
            ExtensionType::Unknown(GROUP_META_EXTENSION),
        ]),
        None,
        None,
    )
}

/// How we create a group named `name` (the name travels in the
/// [`GROUP_META_EXTENSION`] of the group context).
pub(crate) fn create_config(name: &str) -> Result<MlsGroupCreateConfig, InvalidExtensionError> {
    let meta = Extension::Unknown(
        GROUP_META_EXTENSION,
        UnknownExtension(name.as_bytes().to_vec()),
    );
    Ok(MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .capabilities(capabilities())
        .with_group_context_extensions(Extensions::single(meta)?)
        .build())
}

/// How we join a group from a Welcome.
pub(crate) fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .build()
}
