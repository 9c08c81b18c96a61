//! Operations on one group: create, invite, remove, self-update, commit
//! pending proposals, confirm or abort a pending commit, leave, send; and
//! the `groups` table that maps local group names to MLS group ids.

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    BasicCredential, GroupId, KeyPackageIn, LeafNodeIndex, LeafNodeParameters, MlsGroup,
    MlsMessageOut, OpenMlsProvider, ProtocolVersion,
};
use rusqlite::{Connection, OptionalExtension, params};

use super::db::sql_int;
use super::history::{insert_message, mark_processed};
use super::mls::{others, outgoing, username_of};
use super::transaction::{Op, Target, begin, commit};
use super::{Profile, Provider, keyage, outbox, pending};
use crate::file::{self, FileInfo, FileStatus};
use crate::group::{
    CommitOutcome, Event, GroupError, Outgoing, StoredMessage, message_id_at, random_id,
    valid_group_name,
};
use crate::identity::IdentityKey;
use crate::keypackage::KeyPackageError;
use crate::message::{AppMessage, Content, FORMAT_VERSION};
use crate::mls_config::create_config;

impl Profile {
    /// Creates a group named `name` with this client as its only member.
    pub fn create_group(&mut self, name: &str) -> Result<Vec<u8>, GroupError> {
        if !valid_group_name(name) {
            return Err(GroupError::BadName);
        }
        let tx = begin(&mut self.conn, &mut self.cache)?;
        if name_taken(&tx, name)? {
            return Err(GroupError::GroupExists(name.to_string()));
        }
        let provider = Provider::new(&tx);
        let config = create_config(name).map_err(GroupError::mls)?;
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
        .map_err(GroupError::mls)?;
        insert_group(&tx, &group_id, name, self.clock.unix_ms())?;
        commit(tx, &mut self.cache)?;
        self.cache.put(group_id.clone(), group);
        Ok(group_id)
    }

    /// Whether a local group named `name` exists.
    pub fn has_group(&self, name: &str) -> Result<bool, GroupError> {
        name_taken(&self.conn, name)
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
                .map_err(GroupError::mls)?;
            commit_outcome(op, recipients, &commit, Some((vec![invitee], &welcome)))
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
                .map_err(GroupError::mls)?;
            commit_outcome(op, recipients, &commit, None)
        })
    }

    /// Refreshes this client's leaf keys (post-compromise security).
    pub fn self_update(&mut self, group: &str) -> Result<CommitOutcome, GroupError> {
        self.with_group(Target::Name(group), |op, g| {
            let recipients = others(g, op.me());
            let bundle = g
                .self_update(&op.provider, op.signer(), LeafNodeParameters::default())
                .map_err(GroupError::mls)?;
            let (commit, _welcome, _info) = bundle.into_contents();
            commit_outcome(op, recipients, &commit, None)
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
                .map_err(GroupError::mls)?;
            if welcome.is_some() {
                return Err(GroupError::ProposalsAddMembers);
            }
            commit_outcome(op, recipients, &commit, None).map(Some)
        })
    }

    /// The server accepted our pending commit: apply it.
    pub fn confirm_commit(&mut self, group_id: &[u8]) -> Result<(), GroupError> {
        self.with_group(Target::Id(group_id), |op, g| {
            g.merge_pending_commit(&op.provider)
                .map_err(GroupError::mls)?;
            pending::forget(op.tx, op.group_id)
        })
    }

    /// The server accepted our pending commit: apply it and, in the same
    /// transaction, put its Welcome (if any) in the outbox.  The commit is
    /// merged from now on, so the invitees must get their Welcome even if
    /// sending it fails now or this client stops first: [`Profile::outbox`]
    /// lists it until [`Profile::outbox_sent`] removes it.  Returns the
    /// events of held messages that the new epoch lets apply.
    pub fn confirm_commit_and_queue(
        &mut self,
        outcome: &CommitOutcome,
    ) -> Result<Vec<Event>, GroupError> {
        self.with_group(Target::Id(&outcome.group_id), |op, g| {
            // Settled already (a retry got there first): nothing to do.
            if !pending::is_pending(op.tx, outcome)? {
                return Ok(());
            }
            g.merge_pending_commit(&op.provider)
                .map_err(GroupError::mls)?;
            pending::forget(op.tx, op.group_id)?;
            if let Some(w) = &outcome.welcome {
                outbox::enqueue(op.tx, w, op.now_ms)?;
            }
            Ok(())
        })?;
        // The new epoch may be what held messages waited for.
        if self.held_count()? > 0 {
            return self.retry_held();
        }
        Ok(Vec::new())
    }

    /// The server stored nothing of our commit `outcome`: discard it, if it
    /// is still the one pending (an answer that comes after the commit was
    /// settled changes nothing).
    pub fn discard_commit(&mut self, outcome: &CommitOutcome) -> Result<(), GroupError> {
        self.with_group(Target::Id(&outcome.group_id), |op, g| {
            if !pending::is_pending(op.tx, outcome)? {
                return Ok(());
            }
            g.clear_pending_commit(op.provider.storage())
                .map_err(GroupError::mls)?;
            pending::forget(op.tx, op.group_id)
        })
    }

    /// The server rejected our pending commit: discard it.
    pub fn abort_commit(&mut self, group_id: &[u8]) -> Result<(), GroupError> {
        self.with_group(Target::Id(group_id), |op, g| {
            g.clear_pending_commit(op.provider.storage())
                .map_err(GroupError::mls)?;
            pending::forget(op.tx, op.group_id)
        })
    }

    /// Proposes our own removal to the others and forgets the group locally.
    /// Returns the proposal to send (none if we were alone).
    pub fn leave(&mut self, group: &str) -> Result<Option<Outgoing>, GroupError> {
        let me = self.identity_key();
        let now_ms = self.clock.unix_ms();
        let tx = begin(&mut self.conn, &mut self.cache)?;
        let group_id = group_id_by_name(&tx, group)?;
        let provider = Provider::new(&tx);
        // Taken out of the cache for good: the group is deleted below.
        let mut g = self.cache.take(&tx, &group_id)?;
        let recipients = others(&g, me);
        let out = if g.is_active() && !recipients.is_empty() {
            let proposal = g
                .leave_group(&provider, self.identity.key_pair())
                .map_err(GroupError::mls)?;
            Some(outgoing(recipients, message_id_at(now_ms)?, &proposal)?)
        } else {
            None
        };
        g.delete(provider.storage()).map_err(GroupError::mls)?;
        tx.execute("DELETE FROM groups WHERE group_id = ?1", [&group_id])?;
        // What the others still send there is not worth keeping.
        tx.execute(
            "INSERT OR REPLACE INTO left_groups (group_id, left_at) VALUES (?1, ?2)",
            params![group_id, sql_int(now_ms)],
        )?;
        tx.execute("DELETE FROM held WHERE group_id = ?1", [&group_id])?;
        pending::forget(&tx, &group_id)?;
        commit(tx, &mut self.cache)?;
        Ok(out)
    }

    /// Encrypts a text message for the group and records it in our history.
    pub fn send_text(&mut self, group: &str, text: &str) -> Result<Outgoing, GroupError> {
        self.send_app(group, |id, now| {
            Ok((AppMessage::text(id, now, text)?, text.to_string(), None))
        })
    }

    /// Encrypts a file for the group and records it in our history: `name`
    /// is its base name, `content` at most
    /// [`MAX_FILE_BYTES`](crate::file::MAX_FILE_BYTES).  Returns what to
    /// send and the file as the history keeps it.
    pub fn send_file(
        &mut self,
        group: &str,
        name: &str,
        media_type: &str,
        content: Vec<u8>,
    ) -> Result<(Outgoing, FileInfo), GroupError> {
        let info = FileInfo {
            name: file::sanitize_name(name),
            media_type: file::sanitize_media_type(media_type),
            size: u64::try_from(content.len()).unwrap_or(u64::MAX),
            sha256: file::sha256_hex(&content),
            status: FileStatus::Sent,
        };
        let shown = info.clone();
        let out = self.send_app(group, move |id, now| {
            let m = AppMessage::file(id, now, name, media_type, content)?;
            Ok((m, shown.summary(), Some(shown)))
        })?;
        Ok((out, info))
    }

    /// Encrypts `content` for the group as a new application message, as it
    /// is: nothing is checked and nothing goes into our history.  For
    /// content this profile has no method for, and for tests that play a
    /// member sending what no honest client sends.
    pub fn send_content(&mut self, group: &str, content: Content) -> Result<Outgoing, GroupError> {
        self.with_group(Target::Name(group), |op, g| {
            if !g.is_active() {
                return Err(GroupError::Inactive);
            }
            let id = message_id_at(op.now_ms)?;
            let body = AppMessage {
                v: FORMAT_VERSION,
                id: hex::encode(id),
                ts: op.now_ms,
                content,
            }
            .encode()?;
            op.encrypt(g, others(g, op.me()), id, &body)
        })
    }

    /// Encrypts the application message `build` makes (from the message id
    /// and time) for the group and records it in our history, as its text
    /// and file.
    fn send_app(
        &mut self,
        group: &str,
        build: impl FnOnce([u8; 16], u64) -> Result<(AppMessage, String, Option<FileInfo>), GroupError>,
    ) -> Result<Outgoing, GroupError> {
        self.with_group(Target::Name(group), |op, g| {
            if !g.is_active() {
                return Err(GroupError::Inactive);
            }
            let me = op.me();
            let id = message_id_at(op.now_ms)?;
            let now = op.now_ms;
            let (message, text, file) = build(id, now)?;
            let body = message.encode()?;
            let out = op.encrypt(g, others(g, me), id, &body)?;
            let stored = StoredMessage {
                group: group.to_string(),
                sender: op.username.to_string(),
                sender_key: me,
                sent_at_ms: now,
                received_at_ms: now,
                text,
                message_id: hex::encode(id),
                file,
            };
            // Our own message: the user typed it.
            insert_message(op.tx, op.group_id, &stored, true)?;
            keyage::count_sent(op.tx, op.group_id)?;
            Ok(out)
        })
    }
}

/// The pending `commit`, addressed to `recipients` (no message when there
/// are none), and its Welcome, each under a fresh delivery id; recorded as
/// pending in the operation's transaction.
fn commit_outcome(
    op: &Op<'_>,
    recipients: Vec<IdentityKey>,
    commit: &MlsMessageOut,
    welcome: Option<(Vec<IdentityKey>, &MlsMessageOut)>,
) -> Result<CommitOutcome, GroupError> {
    let now_ms = op.now_ms;
    let commit = if recipients.is_empty() {
        None
    } else {
        Some(outgoing(recipients, message_id_at(now_ms)?, commit)?)
    };
    let welcome = match welcome {
        Some((to, w)) => Some(outgoing(to, message_id_at(now_ms)?, w)?),
        None => None,
    };
    let outcome = CommitOutcome {
        group_id: op.group_id.to_vec(),
        commit,
        welcome,
    };
    pending::save(op.tx, &outcome, now_ms)?;
    Ok(outcome)
}

impl Op<'_> {
    /// Encrypts the application message `body` (delivery id `id`) in
    /// `group` for `recipients`, and records the id as processed.
    pub(super) fn encrypt(
        &self,
        group: &mut MlsGroup,
        recipients: Vec<IdentityKey>,
        id: [u8; 16],
        body: &[u8],
    ) -> Result<Outgoing, GroupError> {
        let message = group
            .create_message(&self.provider, self.signer(), body)
            .map_err(GroupError::mls)?;
        mark_processed(self.tx, &id, self.now_ms)?;
        outgoing(recipients, id, &message)
    }
}

/// Whether a local group is named `name`.
pub(super) fn name_taken(conn: &Connection, name: &str) -> Result<bool, GroupError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM groups WHERE name = ?1")?
        .query_row([name], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Records that we are in the group `group_id`, under the local `name`.
pub(super) fn insert_group(
    conn: &Connection,
    group_id: &[u8],
    name: &str,
    now_ms: u64,
) -> Result<(), GroupError> {
    conn.execute(
        "INSERT INTO groups (group_id, name, created_at) VALUES (?1, ?2, ?3)",
        params![group_id, name, sql_int(now_ms)],
    )?;
    Ok(())
}

/// The id of the local group named `name`.
pub(super) fn group_id_by_name(conn: &Connection, name: &str) -> Result<Vec<u8>, GroupError> {
    conn.prepare_cached("SELECT group_id FROM groups WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?
        .ok_or_else(|| GroupError::NoSuchGroup(name.to_string()))
}

/// The local name of a group, if we are in it.
pub(super) fn name_by_group_id(
    conn: &Connection,
    group_id: &[u8],
) -> Result<Option<String>, GroupError> {
    Ok(conn
        .prepare_cached("SELECT name FROM groups WHERE group_id = ?1")?
        .query_row([group_id], |r| r.get(0))
        .optional()?)
}
