//! The public data of group operations: what they return ([`Outgoing`],
//! [`CommitOutcome`], [`Event`], [`StoredMessage`], [`MemberInfo`],
//! [`GroupSummary`]), what they take ([`Delivered`]), their error
//! ([`GroupError`]), delivery message ids and the limits.
//!
//! The operations themselves are methods of [`crate::Profile`] (see
//! [`crate::profile`]), which builds on this module; this module knows
//! nothing of the profile.

use crate::clock::Clock;
use crate::error::StateError;
use crate::file::FileInfo;
use crate::identity::IdentityKey;
use crate::keypackage::KeyPackageError;
use crate::message::MessageError;

pub use crate::mls_config::{GROUP_META_EXTENSION, MAX_PAST_EPOCHS};

/// Longest group name.
pub const MAX_GROUP_NAME: usize = 64;

/// Errors of group operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// profile storage failed
    #[error(transparent)]
    State(#[from] StateError),
    /// a key package was invalid or could not be built
    #[error(transparent)]
    KeyPackage(#[from] KeyPackageError),
    /// an application message could not be encoded or decoded
    #[error(transparent)]
    Message(#[from] MessageError),
    /// no local group by that name
    #[error("no group named {0:?}")]
    NoSuchGroup(String),
    /// a local group by that name exists
    #[error("a group named {0:?} exists already")]
    GroupExists(String),
    /// the name is not a valid group name
    #[error("group names are 1-{MAX_GROUP_NAME} printable characters")]
    BadName,
    /// the user is not in the group
    #[error("{0} is not a member of the group")]
    NotAMember(String),
    /// the user is in the group already
    #[error("{0} is already a member of the group")]
    AlreadyMember(String),
    /// a key package did not belong to the expected identity
    #[error("the key package does not belong to the invitee")]
    WrongInvitee,
    /// we were removed from this group
    #[error("this client is no longer a member of the group")]
    Inactive,
    /// a Welcome that is not addressed to this client
    #[error("the Welcome is not for this client")]
    WelcomeNotForUs,
    /// a message for a group this client is not in
    #[error("message for an unknown group")]
    UnknownGroup,
    /// a Welcome or commit would give the group a member whose identity key
    /// no private key belongs to (see [`IdentityKey::check`])
    #[error("a member's identity key is not a canonical Ed25519 key of prime order")]
    WeakMemberKey,
    /// a Welcome for a group this client is in already
    #[error("the Welcome is for a group this client is in already")]
    AlreadyJoined,
    /// [`crate::Profile::commit_pending`] found nothing to commit (built by
    /// callers that need a commit where there may be none)
    #[error("no proposals are pending in the group")]
    NothingPending,
    /// the pending proposals add members, which this client does not commit
    /// (it would have no key package to send the Welcome with)
    #[error("the pending proposals add members; committing them is not supported")]
    ProposalsAddMembers,
    /// the system random number generator failed
    #[error("the system random number generator failed")]
    Rng,
    /// input from a peer failed validation: bytes that are no MLS message, a
    /// message type that does not belong in a queue, a bad signature, a
    /// replay, a wrong epoch, a removed sender, an application message from
    /// a non-member, a Welcome that fails to verify.  The reason is openmls's
    /// error as text, for logs: openmls's error types are generic over the
    /// storage provider and nothing acts on the difference (the payload is
    /// dropped either way).
    #[error("rejected input: {0}")]
    Rejected(String),
    /// an MLS operation of our own failed inside openmls (creating a group,
    /// committing, merging or clearing a pending commit, encrypting,
    /// serialising).  openmls's error as text, for logs: these fail only on
    /// a storage failure or a bug, and no caller acts on which.
    #[error("MLS operation failed: {0}")]
    Mls(String),
}

impl GroupError {
    /// An MLS operation of our own failed; openmls's error as text.
    pub(crate) fn mls(e: impl std::fmt::Display) -> Self {
        Self::Mls(e.to_string())
    }

    /// Input from a peer failed validation; the reason as text.
    pub(crate) fn rejected(e: impl std::fmt::Display) -> Self {
        Self::Rejected(e.to_string())
    }
}

impl From<rusqlite::Error> for GroupError {
    fn from(e: rusqlite::Error) -> Self {
        Self::State(StateError::Sqlite(e))
    }
}

/// A payload to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// who gets it (never includes this client)
    pub recipients: Vec<IdentityKey>,
    /// delivery message id (idempotency key)
    pub message_id: [u8; 16],
    /// MLS message bytes
    pub payload: Vec<u8>,
}

/// A pending commit and what to send for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOutcome {
    /// the group's MLS id
    pub group_id: Vec<u8>,
    /// the commit for the other members; `None` when there are none (then
    /// there is no race to lose: confirm it right away)
    pub commit: Option<Outgoing>,
    /// the Welcome for new members, to send after the commit is accepted
    pub welcome: Option<Outgoing>,
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// local group name
    pub group: String,
    /// sender's username (from the MLS credential)
    pub sender: String,
    /// sender's identity key
    pub sender_key: IdentityKey,
    /// sender's clock, Unix ms
    pub sent_at_ms: u64,
    /// our clock when it arrived, Unix ms
    pub received_at_ms: u64,
    /// text (or a placeholder for unsupported content); for a file, its
    /// one-line summary ([`FileInfo::summary`])
    pub text: String,
    /// message id (hex)
    pub message_id: String,
    /// the file, when the message is one
    pub file: Option<FileInfo>,
}

/// Something that happened while processing incoming messages.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// we joined a group from a Welcome
    Joined {
        /// local group name
        group: String,
        /// who added us
        by: String,
        /// members at join time
        members: Vec<String>,
    },
    /// a new message
    Message(StoredMessage),
    /// members were added
    MembersAdded {
        /// group
        group: String,
        /// committer
        by: String,
        /// added usernames
        members: Vec<String>,
    },
    /// members were removed
    MembersRemoved {
        /// group
        group: String,
        /// committer
        by: String,
        /// removed usernames
        members: Vec<String>,
    },
    /// a member refreshed their keys (post-compromise security)
    KeyUpdated {
        /// group
        group: String,
        /// who
        by: String,
    },
    /// we were removed from a group
    Removed {
        /// group
        group: String,
        /// committer
        by: String,
    },
    /// a member announced how to reach them directly
    PeerAnnounced {
        /// group it was announced in
        group: String,
        /// the member
        member: String,
        /// their identity key
        key: IdentityKey,
        /// their iroh endpoint id
        endpoint_id: [u8; 32],
    },
    /// a member announced their delivery token (protocol section 9.10):
    /// messages to them now count as a group member's
    DeliveryTokenAnnounced {
        /// group it was announced in
        group: String,
        /// the member
        member: String,
        /// their identity key
        key: IdentityKey,
    },
    /// a member's credential names a user whose key in the server's
    /// directory is different: someone may be impersonating `member`
    DirectoryMismatch {
        /// group
        group: String,
        /// the name the member's credential claims
        member: String,
        /// the member's actual key in the group
        key: IdentityKey,
    },
    /// a member's credential names a contact the user verified, but the
    /// member's identity key is not the verified one: someone may be
    /// impersonating `member`, or they started over with a new identity
    VerifiedKeyChanged {
        /// group
        group: String,
        /// the name the member's credential claims
        member: String,
        /// the member's key in the group
        key: IdentityKey,
        /// the key the user verified for that name
        verified: IdentityKey,
    },
    /// the connection to the server was lost; the client reconnects by itself
    Disconnected {
        /// why, for people
        reason: String,
    },
    /// the connection to the server is back (after [`Event::Disconnected`])
    Reconnected,
    /// a message could not be decrypted or applied.  One that may apply
    /// later (from an epoch this profile has not reached, or for a group
    /// whose Welcome has not arrived) is kept, up to
    /// [`crate::profile::MAX_HELD`] messages, and processed again when its
    /// group's epoch changes or the group is joined: its own events come
    /// then.  One that never can (its epoch is past) or finds the hold full
    /// is dropped.
    Undecryptable {
        /// local group name (`None`: a group this profile is not in)
        group: Option<String>,
        /// kept for a retry (`false`: dropped)
        kept: bool,
        /// messages held now
        held: u64,
    },
    /// proposals arrived (e.g. a member leaving) that a commit must cover;
    /// call [`crate::Profile::commit_pending`]
    ProposalsPending {
        /// group
        group: String,
        /// MLS group id
        group_id: Vec<u8>,
    },
}

/// A member as shown to users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// username from the credential
    pub username: String,
    /// identity key
    pub key: IdentityKey,
    /// this client
    pub is_self: bool,
}

/// A group as listed to users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    /// local name
    pub name: String,
    /// MLS group id
    pub group_id: Vec<u8>,
    /// current epoch
    pub epoch: u64,
    /// member usernames
    pub members: Vec<String>,
}

/// A payload the delivery service handed us, with its queue position.
#[derive(Debug, Clone, Copy)]
pub struct Delivered<'a> {
    /// queue sequence number
    pub seq: u64,
    /// delivery message id
    pub message_id: &'a [u8],
    /// MLS message bytes
    pub payload: &'a [u8],
}

/// Bytes of a message id that carry its creation time.
pub const MESSAGE_ID_TIME_BYTES: usize = 6;

/// How long the ids of processed messages are remembered, counted from the
/// time in the id: 30 days, four times the server's default dedup window.
/// Past it a redelivered message is still never shown twice: MLS deletes a
/// message key once used and rejects commits and proposals of past epochs,
/// so such a message fails to decrypt or to apply.
pub const PROCESSED_HORIZON_MS: u64 = 30 * 24 * 3600 * 1000;

/// 16 random bytes from the system RNG.
pub(crate) fn random_id() -> Result<[u8; 16], GroupError> {
    let mut id = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| GroupError::Rng)?;
    Ok(id)
}

/// A new delivery message id: the current Unix time in milliseconds in the
/// first [`MESSAGE_ID_TIME_BYTES`] bytes (big-endian), then 80 random bits.
///
/// Ids made one after the other sort one after the other, so the indexes
/// keyed by them (the server's idempotency keys, our `processed` table) grow
/// at their right edge instead of touching a random page per message.  The
/// time says nothing the server and the recipients do not already know: the
/// server sees when a message arrives, recipients read the time inside it.
pub fn new_message_id(clock: &dyn Clock) -> Result<[u8; 16], GroupError> {
    message_id_at(clock.unix_ms())
}

/// A new delivery message id for the time `now_ms` (see [`new_message_id`]).
pub(crate) fn message_id_at(now_ms: u64) -> Result<[u8; 16], GroupError> {
    let mut id = random_id()?;
    let ms = now_ms.to_be_bytes();
    id[..MESSAGE_ID_TIME_BYTES].copy_from_slice(&ms[ms.len() - MESSAGE_ID_TIME_BYTES..]);
    Ok(id)
}

/// Whether `name` may name a group: 1 to [`MAX_GROUP_NAME`] bytes, no
/// control characters.
pub(crate) fn valid_group_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_GROUP_NAME && !name.chars().any(char::is_control)
}
