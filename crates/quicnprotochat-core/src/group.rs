//! MLS groups: create, invite, join, send, process, remove, update, leave.
//!
//! Every method runs in one SQLite transaction on the profile: MLS state,
//! history and bookkeeping change together or not at all.  Input from peers
//! that fails validation is a [`GroupError`] and leaves state untouched.
//!
//! Commits follow the delivery service's ordering: an operation that commits
//! returns a [`CommitOutcome`] while the commit stays *pending*; the caller
//! sends it and then calls [`Profile::confirm_commit`] (the server accepted
//! it) or [`Profile::abort_commit`] (the server answered `staleEpoch`: another
//! member's commit won; process it, then retry).

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{
    BasicCredential, Credential, GroupId, KeyPackageIn, LeafNodeIndex, LeafNodeParameters,
    MlsGroup, MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, OpenMlsProvider,
    ProcessedMessageContent, ProcessedWelcome, ProtocolMessage, ProtocolVersion, Sender,
};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use crate::identity::IdentityKey;
use crate::keypackage::KeyPackageError;
use crate::message::{AppMessage, Content, MessageError, PeerInfo};
use crate::mls_config::{create_config, join_config};
use crate::state::{Profile, Provider, StateError, set_setting_on};

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
    /// input from a peer failed MLS validation (bad signature, replay, wrong
    /// epoch, removed sender, garbage)
    #[error("rejected input: {0}")]
    Rejected(String),
    /// an MLS operation of our own failed
    #[error("MLS operation failed: {0}")]
    Mls(String),
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
    /// text (or a placeholder for unsupported content)
    pub text: String,
    /// message id (hex)
    pub message_id: String,
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
    /// proposals arrived (e.g. a member leaving) that a commit must cover;
    /// call [`Profile::commit_pending`]
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn random_id() -> Result<[u8; 16], GroupError> {
    let mut id = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| GroupError::Mls("system RNG failed".into()))?;
    Ok(id)
}

/// Bytes of a message id that carry its creation time.
pub const MESSAGE_ID_TIME_BYTES: usize = 6;

/// A new delivery message id: the current Unix time in milliseconds in the
/// first [`MESSAGE_ID_TIME_BYTES`] bytes (big-endian), then 80 random bits.
///
/// Ids made one after the other sort one after the other, so the indexes
/// keyed by them (the server's idempotency keys, our `processed` table) grow
/// at their right edge instead of touching a random page per message.  The
/// time says nothing the server and the recipients do not already know: the
/// server sees when a message arrives, recipients read the time inside it.
pub fn new_message_id() -> Result<[u8; 16], GroupError> {
    let mut id = random_id()?;
    let ms = now_ms().to_be_bytes();
    id[..MESSAGE_ID_TIME_BYTES].copy_from_slice(&ms[ms.len() - MESSAGE_ID_TIME_BYTES..]);
    Ok(id)
}

fn username_of(c: &Credential) -> String {
    BasicCredential::try_from(c.clone())
        .ok()
        .and_then(|b| String::from_utf8(b.identity().to_vec()).ok())
        .unwrap_or_else(|| "<unknown>".into())
}

fn valid_group_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_GROUP_NAME && !name.chars().any(char::is_control)
}

fn mls<E: std::fmt::Display>(e: E) -> GroupError {
    GroupError::Mls(e.to_string())
}

fn rejected<E: std::fmt::Display>(e: E) -> GroupError {
    GroupError::Rejected(e.to_string())
}

fn load(conn: &Connection, group_id: &[u8]) -> Result<MlsGroup, GroupError> {
    MlsGroup::load(
        Provider::new(conn).storage(),
        &GroupId::from_slice(group_id),
    )
    .map_err(|e| GroupError::State(StateError::storage(e)))?
    .ok_or(GroupError::UnknownGroup)
}

fn group_id_by_name(conn: &Connection, name: &str) -> Result<Vec<u8>, GroupError> {
    conn.prepare_cached("SELECT group_id FROM groups WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?
        .ok_or_else(|| GroupError::NoSuchGroup(name.to_string()))
}

fn name_by_group_id(conn: &Connection, group_id: &[u8]) -> Result<Option<String>, GroupError> {
    Ok(conn
        .prepare_cached("SELECT name FROM groups WHERE group_id = ?1")?
        .query_row([group_id], |r| r.get(0))
        .optional()?)
}

/// A member's signature key is a strong Ed25519 identity key.
fn check_member_key(key: &[u8]) -> Result<(), GroupError> {
    IdentityKey::from_slice(key)
        .and_then(|k| k.check())
        .map_err(|_| GroupError::WeakMemberKey)
}

fn member_key(m: &openmls::prelude::Member) -> Option<IdentityKey> {
    IdentityKey::from_slice(&m.signature_key).ok()
}

fn others(group: &MlsGroup, me: IdentityKey) -> Vec<IdentityKey> {
    group
        .members()
        .filter_map(|m| member_key(&m))
        .filter(|k| *k != me)
        .collect()
}

fn to_bytes(m: &MlsMessageOut) -> Result<Vec<u8>, GroupError> {
    m.tls_serialize_detached().map_err(mls)
}

/// How long the ids of processed messages are remembered, counted from the
/// time in the id: 30 days, four times the server's default dedup window.
/// Past it a redelivered message is still never shown twice: MLS deletes a
/// message key once used and rejects commits and proposals of past epochs,
/// so such a message fails to decrypt or to apply.
pub const PROCESSED_HORIZON_MS: u64 = 30 * 24 * 3600 * 1000;

/// Forgets processed ids whose time part is older than the horizon: a range
/// at the start of the table's key order, so this reads only what it deletes.
/// (An id not made by [`new_message_id`] sorts by its first bytes; if those
/// read as an old time it is forgotten early, which MLS covers as above.)
fn prune_processed(conn: &Connection, now_ms: u64) -> Result<usize, GroupError> {
    let cutoff = now_ms.saturating_sub(PROCESSED_HORIZON_MS).to_be_bytes();
    let mut bound = [0u8; 16];
    bound[..MESSAGE_ID_TIME_BYTES].copy_from_slice(&cutoff[cutoff.len() - MESSAGE_ID_TIME_BYTES..]);
    Ok(conn
        .prepare_cached("DELETE FROM processed WHERE message_id < ?1")?
        .execute([&bound[..]])?)
}

fn mark_processed(conn: &Connection, message_id: &[u8]) -> Result<(), GroupError> {
    conn.prepare_cached("INSERT OR IGNORE INTO processed (message_id, at) VALUES (?1, ?2)")?
        .execute(params![
            message_id,
            i64::try_from(now_ms()).unwrap_or(i64::MAX)
        ])?;
    Ok(())
}

fn insert_message(
    conn: &Connection,
    group_id: &[u8],
    m: &StoredMessage,
) -> Result<bool, GroupError> {
    let id = hex::decode(&m.message_id).map_err(rejected)?;
    let n = conn.prepare_cached(
        "INSERT OR IGNORE INTO messages (group_id, message_id, sender, sender_key, sent_at, received_at, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
            group_id,
            id,
            m.sender,
            m.sender_key.as_bytes(),
            i64::try_from(m.sent_at_ms).unwrap_or(i64::MAX),
            i64::try_from(m.received_at_ms).unwrap_or(i64::MAX),
            m.text
        ],
    )?;
    Ok(n == 1)
}

fn store_peer(conn: &Connection, key: IdentityKey, peer: &PeerInfo) -> Result<(), GroupError> {
    let addrs: Vec<String> = peer.addrs.iter().map(ToString::to_string).collect();
    conn.execute(
        "INSERT INTO peers (identity, endpoint_id, addrs, relay_url, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (identity) DO UPDATE SET endpoint_id = excluded.endpoint_id, addrs = excluded.addrs,
             relay_url = excluded.relay_url, updated_at = excluded.updated_at",
        params![
            key.as_bytes(),
            peer.endpoint_id,
            addrs.join(","),
            peer.relay_url,
            i64::try_from(now_ms()).unwrap_or(i64::MAX)
        ],
    )?;
    Ok(())
}

fn unique_name(conn: &Connection, wanted: &str) -> Result<String, GroupError> {
    let base = if valid_group_name(wanted) {
        wanted.to_string()
    } else {
        "group".to_string()
    };
    let mut name = base.clone();
    let mut n = 2;
    while conn
        .query_row("SELECT 1 FROM groups WHERE name = ?1", [&name], |_| Ok(()))
        .optional()?
        .is_some()
    {
        name = format!("{base}-{n}");
        n += 1;
    }
    Ok(name)
}

fn commit_outcome(
    group_id: &[u8],
    recipients: Vec<IdentityKey>,
    commit: &MlsMessageOut,
    welcome: Option<(Vec<IdentityKey>, &MlsMessageOut)>,
) -> Result<CommitOutcome, GroupError> {
    let commit = if recipients.is_empty() {
        None
    } else {
        Some(Outgoing {
            recipients,
            message_id: new_message_id()?,
            payload: to_bytes(commit)?,
        })
    };
    let welcome = match welcome {
        Some((to, w)) => Some(Outgoing {
            recipients: to,
            message_id: new_message_id()?,
            payload: to_bytes(w)?,
        }),
        None => None,
    };
    Ok(CommitOutcome {
        group_id: group_id.to_vec(),
        commit,
        welcome,
    })
}

/// MLS groups kept in memory between operations.
///
/// openmls writes every change of a group through its storage provider as it
/// makes it, so an [`MlsGroup`] held in memory stays equal to the stored one
/// as long as every transaction that changed it committed.  The cache keeps
/// that invariant:
///
/// - a group is taken out of the cache for an operation and put back only
///   after the operation's transaction committed; a failed operation (a
///   rejected message, a storage error) drops it, and the next operation
///   loads it again from the database;
/// - every write transaction is `BEGIN IMMEDIATE` and starts by reading
///   `PRAGMA data_version`, which changes when another connection (another
///   process on the same profile) committed: then the whole cache is
///   dropped, so state written elsewhere is never overwritten with a stale
///   copy.
#[derive(Default)]
pub(crate) struct GroupCache {
    groups: HashMap<Vec<u8>, MlsGroup>,
    data_version: Option<i64>,
}

impl GroupCache {
    /// Takes the group out of the cache, or loads it.
    fn take(&mut self, conn: &Connection, group_id: &[u8]) -> Result<MlsGroup, GroupError> {
        match self.groups.remove(group_id) {
            Some(g) => Ok(g),
            None => load(conn, group_id),
        }
    }

    /// Puts back a group whose changes are committed.
    fn put(&mut self, group_id: Vec<u8>, group: MlsGroup) {
        self.groups.insert(group_id, group);
    }

    /// Forgets everything (a commit failed: memory may be ahead of disk).
    fn clear(&mut self) {
        self.groups.clear();
        self.data_version = None;
    }
}

/// Starts a write transaction and drops cached groups that another
/// connection may have changed.
fn begin<'c>(
    conn: &'c mut Connection,
    cache: &mut GroupCache,
) -> Result<Transaction<'c>, GroupError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA data_version", [], |r| r.get(0))?;
    if cache.data_version != Some(version) {
        cache.groups.clear();
        cache.data_version = Some(version);
    }
    Ok(tx)
}

/// Commits `tx`; if that fails, memory may be ahead of the database.
fn commit(tx: Transaction<'_>, cache: &mut GroupCache) -> Result<(), GroupError> {
    tx.commit().map_err(|e| {
        cache.clear();
        GroupError::from(e)
    })
}

/// Which group an operation is on.
enum Target<'a> {
    Name(&'a str),
    Id(&'a [u8]),
}

/// What an operation on one group gets to work with.
struct Op<'a> {
    tx: &'a Connection,
    provider: Provider<'a>,
    identity: &'a crate::identity::Identity,
    username: &'a str,
    group_id: &'a [u8],
}

impl Op<'_> {
    fn me(&self) -> IdentityKey {
        self.identity.public_key()
    }

    fn signer(&self) -> &openmls_basic_credential::SignatureKeyPair {
        self.identity.key_pair()
    }
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

impl Profile {
    /// Runs `f` on one group in one write transaction; the group's state,
    /// history and bookkeeping change together or not at all.
    fn with_group<T>(
        &mut self,
        target: Target<'_>,
        f: impl FnOnce(&Op<'_>, &mut MlsGroup) -> Result<T, GroupError>,
    ) -> Result<T, GroupError> {
        let tx = begin(&mut self.conn, &mut self.cache)?;
        let group_id = match target {
            Target::Name(name) => group_id_by_name(&tx, name)?,
            Target::Id(id) => id.to_vec(),
        };
        let mut group = self.cache.take(&tx, &group_id)?;
        let out = f(
            &Op {
                tx: &tx,
                provider: Provider::new(&tx),
                identity: &self.identity,
                username: &self.username,
                group_id: &group_id,
            },
            &mut group,
        )?;
        commit(tx, &mut self.cache)?;
        self.cache.put(group_id, group);
        Ok(out)
    }

    /// Creates a group named `name` with this client as its only member.
    pub fn create_group(&mut self, name: &str) -> Result<Vec<u8>, GroupError> {
        if !valid_group_name(name) {
            return Err(GroupError::BadName);
        }
        let tx = begin(&mut self.conn, &mut self.cache)?;
        if tx
            .prepare_cached("SELECT 1 FROM groups WHERE name = ?1")?
            .query_row([name], |_| Ok(()))
            .optional()?
            .is_some()
        {
            return Err(GroupError::GroupExists(name.to_string()));
        }
        let provider = Provider::new(&tx);
        let config = create_config(name).map_err(mls)?;
        let credential = openmls::prelude::CredentialWithKey {
            credential: BasicCredential::new(self.username.as_bytes().to_vec()).into(),
            signature_key: self.identity.public_key().as_bytes().to_vec().into(),
        };
        let group_id = random_id()?.to_vec();
        let group = MlsGroup::new_with_group_id(
            &provider,
            self.identity.key_pair(),
            &config,
            GroupId::from_slice(&group_id),
            credential,
        )
        .map_err(mls)?;
        tx.execute(
            "INSERT INTO groups (group_id, name, created_at) VALUES (?1, ?2, ?3)",
            params![group_id, name, i64::try_from(now_ms()).unwrap_or(i64::MAX)],
        )?;
        commit(tx, &mut self.cache)?;
        self.cache.put(group_id.clone(), group);
        Ok(group_id)
    }

    /// Whether a local group named `name` exists.
    pub fn has_group(&self, name: &str) -> Result<bool, GroupError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM groups WHERE name = ?1")?
            .query_row([name], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Adds the owner of `key_package` (which must belong to `invitee`) to
    /// the group.  The commit stays pending until confirmed or aborted.
    pub fn add_member(
        &mut self,
        group: &str,
        key_package: &[u8],
        invitee: IdentityKey,
    ) -> Result<CommitOutcome, GroupError> {
        self.with_group(Target::Name(group), |op, g| {
            let kp = KeyPackageIn::tls_deserialize_exact(key_package)
                .map_err(|e| KeyPackageError::Decode(e.to_string()))?
                .validate(op.provider.crypto(), ProtocolVersion::Mls10)
                .map_err(|e| KeyPackageError::Invalid(e.to_string()))?;
            if kp.leaf_node().signature_key().as_slice() != invitee.as_bytes() {
                return Err(GroupError::WrongInvitee);
            }
            // openmls verified the package with plain Ed25519 (see
            // `IdentityKey::check`).
            invitee.check().map_err(|_| KeyPackageError::WeakKey)?;
            if !g.is_active() {
                return Err(GroupError::Inactive);
            }
            if g.members().any(|m| m.signature_key == invitee.as_bytes()) {
                return Err(GroupError::AlreadyMember(username_of(
                    kp.leaf_node().credential(),
                )));
            }
            let recipients = others(g, op.me());
            let (commit, welcome, _info) = g
                .add_members(&op.provider, op.signer(), std::slice::from_ref(&kp))
                .map_err(mls)?;
            commit_outcome(
                op.group_id,
                recipients,
                &commit,
                Some((vec![invitee], &welcome)),
            )
        })
    }

    /// Removes `username` from the group (the commit also goes to them, so
    /// they learn it).
    pub fn remove_member(
        &mut self,
        group: &str,
        username: &str,
    ) -> Result<CommitOutcome, GroupError> {
        self.with_group(Target::Name(group), |op, g| {
            let me = op.me();
            let target: Vec<LeafNodeIndex> = g
                .members()
                .filter(|m| {
                    username_of(&m.credential) == username && m.signature_key != me.as_bytes()
                })
                .map(|m| m.index)
                .collect();
            if target.is_empty() {
                return Err(GroupError::NotAMember(username.to_string()));
            }
            let recipients = others(g, me);
            let (commit, _welcome, _info) = g
                .remove_members(&op.provider, op.signer(), &target)
                .map_err(mls)?;
            commit_outcome(op.group_id, recipients, &commit, None)
        })
    }

    /// Refreshes this client's leaf keys (post-compromise security).
    pub fn self_update(&mut self, group: &str) -> Result<CommitOutcome, GroupError> {
        self.with_group(Target::Name(group), |op, g| {
            let recipients = others(g, op.me());
            let bundle = g
                .self_update(&op.provider, op.signer(), LeafNodeParameters::default())
                .map_err(mls)?;
            let (commit, _welcome, _info) = bundle.into_contents();
            commit_outcome(op.group_id, recipients, &commit, None)
        })
    }

    /// Commits proposals received from others (e.g. a member leaving).
    pub fn commit_pending(&mut self, group_id: &[u8]) -> Result<Option<CommitOutcome>, GroupError> {
        self.with_group(Target::Id(group_id), |op, g| {
            if g.pending_proposals().next().is_none() || !g.is_active() {
                return Ok(None);
            }
            let recipients = others(g, op.me());
            let (commit, welcome, _info) = g
                .commit_to_pending_proposals(&op.provider, op.signer())
                .map_err(mls)?;
            if welcome.is_some() {
                return Err(GroupError::Mls(
                    "pending proposals add members; not supported".into(),
                ));
            }
            commit_outcome(op.group_id, recipients, &commit, None).map(Some)
        })
    }

    /// The server accepted our pending commit: apply it.
    pub fn confirm_commit(&mut self, group_id: &[u8]) -> Result<(), GroupError> {
        self.with_group(Target::Id(group_id), |op, g| {
            g.merge_pending_commit(&op.provider).map_err(mls)
        })
    }

    /// The server accepted our pending commit: apply it and, in the same
    /// transaction, put its Welcome (if any) in the outbox.  The commit is
    /// merged from now on, so the invitees must get their Welcome even if
    /// sending it fails now or this client stops first: [`Profile::outbox`]
    /// lists it until [`Profile::outbox_sent`] removes it.
    pub fn confirm_commit_and_queue(&mut self, outcome: &CommitOutcome) -> Result<(), GroupError> {
        self.with_group(Target::Id(&outcome.group_id), |op, g| {
            g.merge_pending_commit(&op.provider).map_err(mls)?;
            if let Some(w) = &outcome.welcome {
                let recipients: Vec<u8> = w
                    .recipients
                    .iter()
                    .flat_map(|r| r.as_bytes().to_vec())
                    .collect();
                op.tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO outbox (message_id, recipients, payload, created_at)
                         VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![
                        &w.message_id[..],
                        recipients,
                        w.payload,
                        i64::try_from(now_ms()).unwrap_or(i64::MAX)
                    ])?;
            }
            Ok(())
        })
    }

    /// Messages waiting to be sent, oldest first.
    pub fn outbox(&self) -> Result<Vec<Outgoing>, GroupError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT message_id, recipients, payload FROM outbox ORDER BY created_at, message_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, recipients, payload) = row?;
            let damaged = || StateError::Storage("damaged outbox entry".into());
            let message_id: [u8; 16] = id.try_into().map_err(|_| damaged())?;
            let recipients = recipients
                .chunks(32)
                .map(|k| IdentityKey::from_slice(k).map_err(|_| damaged()))
                .collect::<Result<Vec<_>, _>>()?;
            out.push(Outgoing {
                recipients,
                message_id,
                payload,
            });
        }
        Ok(out)
    }

    /// The server stored (or, for good, refused) an outbox message: forget it.
    pub fn outbox_sent(&mut self, message_id: &[u8; 16]) -> Result<(), GroupError> {
        self.conn
            .prepare_cached("DELETE FROM outbox WHERE message_id = ?1")?
            .execute([&message_id[..]])?;
        Ok(())
    }

    /// The server rejected our pending commit: discard it.
    pub fn abort_commit(&mut self, group_id: &[u8]) -> Result<(), GroupError> {
        self.with_group(Target::Id(group_id), |op, g| {
            g.clear_pending_commit(op.provider.storage()).map_err(mls)
        })
    }

    /// Encrypts a text message for the group and records it in our history.
    pub fn send_text(&mut self, group: &str, text: &str) -> Result<Outgoing, GroupError> {
        self.with_group(Target::Name(group), |op, g| {
            if !g.is_active() {
                return Err(GroupError::Inactive);
            }
            let me = op.me();
            let id = new_message_id()?;
            let now = now_ms();
            let body = AppMessage::text(id, now, text)?.encode()?;
            let out = g
                .create_message(&op.provider, op.signer(), &body)
                .map_err(mls)?;
            let stored = StoredMessage {
                group: group.to_string(),
                sender: op.username.to_string(),
                sender_key: me,
                sent_at_ms: now,
                received_at_ms: now,
                text: text.to_string(),
                message_id: hex::encode(id),
            };
            insert_message(op.tx, op.group_id, &stored)?;
            mark_processed(op.tx, &id)?;
            Ok(Outgoing {
                recipients: others(g, me),
                message_id: id,
                payload: to_bytes(&out)?,
            })
        })
    }

    /// Encrypts an announcement of how to reach this client directly, for
    /// the members of `group` (none if we are alone).
    pub fn announce_peer(
        &mut self,
        group: &str,
        peer: &PeerInfo,
    ) -> Result<Option<Outgoing>, GroupError> {
        self.with_group(Target::Name(group), |op, g| {
            let recipients = others(g, op.me());
            if !g.is_active() || recipients.is_empty() {
                return Ok(None);
            }
            let id = new_message_id()?;
            let body = AppMessage::peer_address(id, now_ms(), peer).encode()?;
            let out = g
                .create_message(&op.provider, op.signer(), &body)
                .map_err(mls)?;
            mark_processed(op.tx, &id)?;
            Ok(Some(Outgoing {
                recipients,
                message_id: id,
                payload: to_bytes(&out)?,
            }))
        })
    }
    /// How to reach `member` directly, if they announced it.
    pub fn peer(&self, member: IdentityKey) -> Result<Option<PeerInfo>, GroupError> {
        let row: Option<(Vec<u8>, String, Option<String>)> = self
            .conn
            .query_row(
                "SELECT endpoint_id, addrs, relay_url FROM peers WHERE identity = ?1",
                [member.as_bytes()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((id, addrs, relay_url)) = row else {
            return Ok(None);
        };
        let addrs: Vec<String> = addrs
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect();
        Ok(Some(PeerInfo::from_content(
            &hex::encode(id),
            &addrs,
            relay_url.as_deref(),
        )?))
    }

    /// Identity keys of members of our groups (the only peers whose direct
    /// connections we accept).
    fn allowed_peer_keys(&self) -> Result<Vec<IdentityKey>, GroupError> {
        let me = self.identity_key();
        let ids: Vec<Vec<u8>> = self
            .conn
            .prepare("SELECT group_id FROM groups")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut keys = Vec::new();
        for id in ids {
            let g = load(&self.conn, &id)?;
            if g.is_active() {
                keys.extend(others(&g, me));
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// Endpoint ids announced by members of our groups.
    pub fn allowed_endpoint_ids(&self) -> Result<Vec<[u8; 32]>, GroupError> {
        let mut out = Vec::new();
        for key in self.allowed_peer_keys()? {
            if let Some(p) = self.peer(key)? {
                out.push(p.endpoint_id);
            }
        }
        Ok(out)
    }

    /// Proposes our own removal to the others and forgets the group locally.
    /// Returns the proposal to send (none if we were alone).
    pub fn leave(&mut self, group: &str) -> Result<Option<Outgoing>, GroupError> {
        let me = self.identity_key();
        let tx = begin(&mut self.conn, &mut self.cache)?;
        let group_id = group_id_by_name(&tx, group)?;
        let provider = Provider::new(&tx);
        // Taken out of the cache for good: the group is deleted below.
        let mut g = self.cache.take(&tx, &group_id)?;
        let recipients = others(&g, me);
        let out = if g.is_active() && !recipients.is_empty() {
            let proposal = g
                .leave_group(&provider, self.identity.key_pair())
                .map_err(mls)?;
            Some(Outgoing {
                recipients,
                message_id: new_message_id()?,
                payload: to_bytes(&proposal)?,
            })
        } else {
            None
        };
        g.delete(provider.storage()).map_err(mls)?;
        tx.execute("DELETE FROM groups WHERE group_id = ?1", [&group_id])?;
        commit(tx, &mut self.cache)?;
        Ok(out)
    }

    /// Members of a group.
    pub fn members(&self, group: &str) -> Result<Vec<MemberInfo>, GroupError> {
        let me = self.identity_key();
        let group_id = group_id_by_name(&self.conn, group)?;
        let g = load(&self.conn, &group_id)?;
        Ok(g.members()
            .filter_map(|m| {
                let key = member_key(&m)?;
                Some(MemberInfo {
                    username: username_of(&m.credential),
                    key,
                    is_self: key == me,
                })
            })
            .collect())
    }

    /// Identity keys of the other members of a group.
    pub fn recipients(&self, group: &str) -> Result<Vec<IdentityKey>, GroupError> {
        let group_id = group_id_by_name(&self.conn, group)?;
        Ok(others(&load(&self.conn, &group_id)?, self.identity_key()))
    }

    /// All local groups.
    pub fn groups(&self) -> Result<Vec<GroupSummary>, GroupError> {
        let rows: Vec<(Vec<u8>, String)> = self
            .conn
            .prepare("SELECT group_id, name FROM groups ORDER BY name")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        rows.into_iter()
            .map(|(group_id, name)| {
                let g = load(&self.conn, &group_id)?;
                Ok(GroupSummary {
                    members: g.members().map(|m| username_of(&m.credential)).collect(),
                    epoch: g.epoch().as_u64(),
                    group_id,
                    name,
                })
            })
            .collect()
    }

    /// The last `limit` messages of a group, oldest first.
    pub fn history(&self, group: &str, limit: usize) -> Result<Vec<StoredMessage>, GroupError> {
        let group_id = group_id_by_name(&self.conn, group)?;
        let mut rows: Vec<StoredMessage> = self
            .conn
            .prepare(
                "SELECT sender, sender_key, sent_at, received_at, body, message_id FROM messages
                 WHERE group_id = ?1 ORDER BY id DESC LIMIT ?2",
            )?
            .query_map(
                params![group_id, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| {
                    let key: Vec<u8> = r.get(1)?;
                    let id: Vec<u8> = r.get(5)?;
                    Ok((
                        r.get(0)?,
                        key,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get(4)?,
                        id,
                    ))
                },
            )?
            .map(|row| {
                let (sender, key, sent, received, text, id): (
                    String,
                    Vec<u8>,
                    i64,
                    i64,
                    String,
                    Vec<u8>,
                ) = row?;
                Ok(StoredMessage {
                    group: group.to_string(),
                    sender,
                    sender_key: IdentityKey::from_slice(&key).map_err(StateError::from)?,
                    sent_at_ms: u64::try_from(sent).unwrap_or(0),
                    received_at_ms: u64::try_from(received).unwrap_or(0),
                    text,
                    message_id: hex::encode(id),
                })
            })
            .collect::<Result<_, GroupError>>()?;
        rows.reverse();
        Ok(rows)
    }

    /// Records that queue entries up to `seq` are processed (the cursor).
    pub fn set_next_seq(&self, next: u64) -> Result<(), GroupError> {
        Ok(self.set_setting("next_seq", &next.to_le_bytes())?)
    }

    /// Processes one delivered payload (Welcome, commit, proposal or
    /// application message) identified by its delivery `message_id`.  A
    /// payload already processed is ignored (shown once).  On error nothing
    /// changes.
    pub fn process(&mut self, message_id: &[u8], payload: &[u8]) -> Result<Vec<Event>, GroupError> {
        let tx = begin(&mut self.conn, &mut self.cache)?;
        let events = process_in(&tx, &mut self.cache, message_id, payload)?;
        commit(tx, &mut self.cache)?;
        Ok(events)
    }

    /// Processes delivered payloads in queue order in one transaction (one
    /// durable write for the whole batch) and moves the queue cursor past the
    /// last of them in the same transaction.
    ///
    /// Each payload gets its own result: one that peers got wrong (garbage,
    /// a bad signature, a replay, an unknown group) is rolled back alone and
    /// the others still apply.  Ids of processed messages older than
    /// [`PROCESSED_HORIZON_MS`] are forgotten here, so that record stays
    /// bounded.  The outer error is a storage failure; then
    /// nothing of the batch applied and the cursor did not move.
    pub fn process_batch(
        &mut self,
        batch: &[Delivered<'_>],
    ) -> Result<Vec<Result<Vec<Event>, GroupError>>, GroupError> {
        let Some(last) = batch.iter().map(|d| d.seq).max() else {
            return Ok(Vec::new());
        };
        let mut tx = begin(&mut self.conn, &mut self.cache)?;
        let mut results = Vec::with_capacity(batch.len());
        let outcome = (|| {
            prune_processed(&tx, now_ms())?;
            for d in batch {
                let sp = tx.savepoint()?;
                match process_in(&sp, &mut self.cache, d.message_id, d.payload) {
                    Ok(events) => {
                        sp.commit()?;
                        results.push(Ok(events));
                    }
                    // Storage failed: stop; nothing of the batch applies.
                    Err(e @ GroupError::State(_)) => return Err(e),
                    // Dropping the savepoint rolls back this payload alone.
                    Err(e) => results.push(Err(e)),
                }
            }
            set_setting_on(&tx, "next_seq", &last.saturating_add(1).to_le_bytes())?;
            Ok::<_, GroupError>(())
        })();
        if let Err(e) = outcome {
            self.cache.clear();
            return Err(e);
        }
        commit(tx, &mut self.cache)?;
        Ok(results)
    }
}

/// Processes one payload on `conn` (a transaction or a savepoint).  Groups
/// it changed are back in `cache`; the caller clears the cache if `conn`
/// does not commit.
fn process_in(
    conn: &Connection,
    cache: &mut GroupCache,
    message_id: &[u8],
    payload: &[u8],
) -> Result<Vec<Event>, GroupError> {
    let seen = conn
        .prepare_cached("SELECT 1 FROM processed WHERE message_id = ?1")?
        .query_row([message_id], |_| Ok(()))
        .optional()?
        .is_some();
    if seen {
        return Ok(Vec::new());
    }
    let msg = MlsMessageIn::tls_deserialize_exact(payload).map_err(rejected)?;
    let pm = match msg.extract() {
        MlsMessageBodyIn::Welcome(welcome) => {
            let (events, group) = join(conn, welcome)?;
            mark_processed(conn, message_id)?;
            cache.put(group.group_id().as_slice().to_vec(), group);
            return Ok(events);
        }
        MlsMessageBodyIn::PrivateMessage(m) => ProtocolMessage::from(m),
        MlsMessageBodyIn::PublicMessage(m) => ProtocolMessage::from(m),
        _ => return Err(GroupError::Rejected("unexpected MLS message type".into())),
    };
    let group_id = pm.group_id().as_slice().to_vec();
    let name = name_by_group_id(conn, &group_id)?.ok_or(GroupError::UnknownGroup)?;
    let mut group = cache.take(conn, &group_id)?;
    if !group.is_active() {
        // Put back unchanged: a removed member's group stays readable.
        cache.put(group_id, group);
        return Err(GroupError::Inactive);
    }
    let events = handle_protocol(conn, &name, &group_id, &mut group, pm)?;
    mark_processed(conn, message_id)?;
    cache.put(group_id, group);
    Ok(events)
}

/// Joins from a Welcome; returns the events and the group.
fn join(
    tx: &Connection,
    welcome: openmls::prelude::Welcome,
) -> Result<(Vec<Event>, MlsGroup), GroupError> {
    let provider = Provider::new(tx);
    let processed = ProcessedWelcome::new_from_welcome(&provider, &join_config(), welcome)
        .map_err(|e| {
            let text = e.to_string();
            if text.contains("No matching key package") || text.contains("key package") {
                GroupError::WelcomeNotForUs
            } else {
                GroupError::Rejected(text)
            }
        })?;
    let staged = processed
        .into_staged_welcome(&provider, None)
        .map_err(rejected)?;
    let by = staged
        .welcome_sender()
        .map(|l| username_of(l.credential()))
        .unwrap_or_default();
    let g = staged.into_group(&provider).map_err(rejected)?;
    // openmls verifies leaf signatures with plain Ed25519, which a weak key
    // passes; refuse a group with such a member before it is stored.
    for m in g.members() {
        check_member_key(m.signature_key.as_slice())?;
    }
    let wanted = g
        .extensions()
        .unknown(GROUP_META_EXTENSION)
        .and_then(|u| String::from_utf8(u.0.clone()).ok())
        .unwrap_or_else(|| "group".into());
    let group_id = g.group_id().as_slice().to_vec();
    if name_by_group_id(tx, &group_id)?.is_some() {
        return Err(GroupError::Rejected(
            "already a member of this group".into(),
        ));
    }
    let name = unique_name(tx, &wanted)?;
    tx.execute(
        "INSERT INTO groups (group_id, name, created_at) VALUES (?1, ?2, ?3)",
        params![group_id, name, i64::try_from(now_ms()).unwrap_or(i64::MAX)],
    )?;
    let members = g.members().map(|m| username_of(&m.credential)).collect();
    Ok((
        vec![Event::Joined {
            group: name,
            by,
            members,
        }],
        g,
    ))
}

/// Processes a commit, proposal or application message for `g` (active).
fn handle_protocol(
    tx: &Connection,
    name: &str,
    group_id: &[u8],
    g: &mut MlsGroup,
    pm: ProtocolMessage,
) -> Result<Vec<Event>, GroupError> {
    let provider = Provider::new(tx);
    let processed = g.process_message(&provider, pm).map_err(rejected)?;
    let by = username_of(processed.credential());
    let sender_key = match processed.sender() {
        Sender::Member(idx) => g
            .members()
            .find(|m| m.index == *idx)
            .and_then(|m| member_key(&m)),
        _ => None,
    };
    let mut events = Vec::new();
    match processed.into_content() {
        ProcessedMessageContent::ApplicationMessage(app) => {
            let sender_key = sender_key.ok_or_else(|| {
                GroupError::Rejected("application message from a non-member".into())
            })?;
            let m = AppMessage::decode(&app.into_bytes())?;
            let text = match m.content {
                Content::Text { text } => text,
                Content::PeerAddress {
                    endpoint_id,
                    addrs,
                    relay_url,
                } => {
                    let peer = PeerInfo::from_content(&endpoint_id, &addrs, relay_url.as_deref())?;
                    store_peer(tx, sender_key, &peer)?;
                    events.push(Event::PeerAnnounced {
                        group: name.to_string(),
                        member: by,
                        key: sender_key,
                        endpoint_id: peer.endpoint_id,
                    });
                    return Ok(events);
                }
                _ => "[unsupported content]".to_string(),
            };
            let stored = StoredMessage {
                group: name.to_string(),
                sender: by,
                sender_key,
                sent_at_ms: m.ts,
                received_at_ms: now_ms(),
                text,
                message_id: m.id,
            };
            if insert_message(tx, group_id, &stored)? {
                events.push(Event::Message(stored));
            }
        }
        ProcessedMessageContent::ProposalMessage(p) => {
            g.store_pending_proposal(provider.storage(), *p)
                .map_err(mls)?;
            events.push(Event::ProposalsPending {
                group: name.to_string(),
                group_id: group_id.to_vec(),
            });
        }
        ProcessedMessageContent::StagedCommitMessage(sc) => {
            let added: Vec<String> = sc
                .add_proposals()
                .map(|a| username_of(a.add_proposal().key_package().leaf_node().credential()))
                .collect();
            let removed_idx: Vec<LeafNodeIndex> = sc
                .remove_proposals()
                .map(|r| r.remove_proposal().removed())
                .collect();
            let removed: Vec<String> = g
                .members()
                .filter(|m| removed_idx.contains(&m.index))
                .map(|m| username_of(&m.credential))
                .collect();
            // Every leaf the commit brings in (added members, updated leaves,
            // the committer's new path leaf) must carry a strong key.
            for a in sc.add_proposals() {
                check_member_key(
                    a.add_proposal()
                        .key_package()
                        .leaf_node()
                        .signature_key()
                        .as_slice(),
                )?;
            }
            for u in sc.update_proposals() {
                check_member_key(u.update_proposal().leaf_node().signature_key().as_slice())?;
            }
            if let Some(leaf) = sc.update_path_leaf_node() {
                check_member_key(leaf.signature_key().as_slice())?;
            }
            let self_removed = sc.self_removed();
            let updated =
                sc.update_path_leaf_node().is_some() && added.is_empty() && removed.is_empty();
            g.merge_staged_commit(&provider, *sc).map_err(rejected)?;
            if !added.is_empty() {
                events.push(Event::MembersAdded {
                    group: name.to_string(),
                    by: by.clone(),
                    members: added,
                });
            }
            if self_removed {
                events.push(Event::Removed {
                    group: name.to_string(),
                    by: by.clone(),
                });
            } else if !removed.is_empty() {
                events.push(Event::MembersRemoved {
                    group: name.to_string(),
                    by: by.clone(),
                    members: removed,
                });
            }
            if updated {
                events.push(Event::KeyUpdated {
                    group: name.to_string(),
                    by,
                });
            }
        }
        _ => {}
    }
    Ok(events)
}
