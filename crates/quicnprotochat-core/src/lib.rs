//! quicnprotochat core: identity keys, MLS key packages and (later) groups.
//!
//! **Architecture invariant:** this crate does no network IO.  It takes bytes
//! and returns bytes, so the server and the client can both use it and tests
//! can drive it deterministically.
//!
//! Error taxonomy: every function that handles bytes from a peer returns a
//! typed error ([`KeyPackageError`], [`IdentityError`]); such input is
//! attacker-controlled and never panics.

pub mod base64;
pub mod clock;
pub mod error;
pub mod file;
pub mod group;
pub mod identity;
pub mod keypackage;
pub mod message;
pub mod mls_config;
pub mod mls_header;
pub mod profile;
pub mod safety;
pub mod sqlcipher;

pub use error::StateError;
pub use file::{FileInfo, FileStatus};
pub use group::{
    CommitOutcome, Delivered, Event, GroupError, GroupSummary, MemberInfo, Outgoing, StoredMessage,
    new_message_id,
};
pub use identity::{Identity, IdentityError, IdentityKey};
pub use keypackage::{KeyPackageError, KeyPackageInfo};
pub use message::PeerInfo;
pub use profile::{Contact, KeyUpdatePolicy, Profile, ProfileKey, Verification};
pub use safety::SafetyNumber;

/// The ciphersuite quicnprotochat uses by default (RFC 9420 §17.1, the
/// mandatory-to-implement suite).
pub const CIPHERSUITE: openmls::prelude::Ciphersuite =
    openmls::prelude::Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
