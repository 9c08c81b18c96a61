//! Incoming messages: Welcomes (joining a group), commits, proposals and
//! application messages, one at a time or as a batch in one transaction.

use std::path::Path;

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    LeafNodeIndex, MlsGroup, MlsMessageBodyIn, MlsMessageIn, OpenMlsProvider,
    ProcessedMessageContent, ProcessedWelcome, ProtocolMessage, Sender, StagedCommit, WelcomeError,
};
use rusqlite::{Connection, OptionalExtension};

use super::groups::{insert_group, name_by_group_id, name_taken};
use super::history::{has_message, insert_message, mark_processed, prune_processed};
use super::mls::{check_member_key, member_key, username_of};
use super::peers::store_peer;
use super::tokens::store_delivery_token;
use super::transaction::{GroupCache, begin, commit};
use super::{Profile, Provider, held, next_seq_on, pending, set_setting_on};
use crate::file::{self, FileInfo, FileStatus};
use crate::group::{
    Delivered, Event, GROUP_META_EXTENSION, GroupError, StoredMessage, valid_group_name,
};
use crate::identity::IdentityKey;
use crate::message::{AppMessage, Content, PeerInfo, token_from_hex};
use crate::mls_config::join_config;

impl Profile {
    /// Processes one delivered payload (Welcome, commit, proposal or
    /// application message) identified by its delivery `message_id`.  A
    /// payload already processed is ignored (shown once).  On error nothing
    /// changes.
    pub fn process(&mut self, message_id: &[u8], payload: &[u8]) -> Result<Vec<Event>, GroupError> {
        let tx = begin(&mut self.conn, &mut self.cache)?;
        let events = process_in(
            &tx,
            &mut self.cache,
            message_id,
            payload,
            self.clock.unix_ms(),
            &self.downloads,
        )?;
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
    /// [`PROCESSED_HORIZON_MS`](crate::group::PROCESSED_HORIZON_MS) are
    /// forgotten here, so that record stays bounded.  The outer error is a
    /// storage failure; then nothing of the batch applied and the cursor did
    /// not move.
    pub fn process_batch(
        &mut self,
        batch: &[Delivered<'_>],
    ) -> Result<Vec<Result<Vec<Event>, GroupError>>, GroupError> {
        let Some(last) = batch.iter().map(|d| d.seq).max() else {
            return Ok(Vec::new());
        };
        let now_ms = self.clock.unix_ms();
        let mut tx = begin(&mut self.conn, &mut self.cache)?;
        let downloads = self.downloads.as_path();
        let mut results = Vec::with_capacity(batch.len());
        let outcome = (|| {
            prune_processed(&tx, now_ms)?;
            for d in batch {
                let sp = tx.savepoint()?;
                match process_in(
                    &sp,
                    &mut self.cache,
                    d.message_id,
                    d.payload,
                    now_ms,
                    downloads,
                ) {
                    Ok(mut events) => {
                        sp.commit()?;
                        // Its group moved on: what waited for that may apply.
                        if let Some(g) = held::changed_group(&tx, d.payload, &events)?
                            && held::any(&tx, &g)?
                        {
                            events.extend(held::retry(
                                &tx,
                                &mut self.cache,
                                &g,
                                now_ms,
                                downloads,
                            )?);
                        }
                        results.push(Ok(events));
                    }
                    // Storage failed: stop; nothing of the batch applies.
                    Err(e @ GroupError::State(_)) => return Err(e),
                    Err(e) => {
                        // Dropping the savepoint rolls back this payload
                        // alone; one that may apply later is kept.
                        drop(sp);
                        match held::hold(&tx, &mut self.cache, d.message_id, d.payload, &e, now_ms)?
                        {
                            Some(event) => results.push(Ok(vec![event])),
                            None => results.push(Err(e)),
                        }
                    }
                }
            }
            // Never backwards: another reader of the queue may be ahead.
            let next = last.saturating_add(1).max(next_seq_on(&tx)?);
            set_setting_on(&tx, "next_seq", &next.to_le_bytes())?;
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

/// Processes one payload on `conn` (a transaction or a savepoint), saving
/// a file it carries in `downloads`.  Groups it changed are back in
/// `cache`; the caller clears the cache if `conn` does not commit.
pub(super) fn process_in(
    conn: &Connection,
    cache: &mut GroupCache,
    message_id: &[u8],
    payload: &[u8],
    now_ms: u64,
    downloads: &Path,
) -> Result<Vec<Event>, GroupError> {
    let seen = conn
        .prepare_cached("SELECT 1 FROM processed WHERE message_id = ?1")?
        .query_row([message_id], |_| Ok(()))
        .optional()?
        .is_some();
    if seen {
        return Ok(Vec::new());
    }
    let msg = MlsMessageIn::tls_deserialize_exact(payload).map_err(GroupError::rejected)?;
    let pm = match msg.extract() {
        MlsMessageBodyIn::Welcome(welcome) => {
            let (events, group) = join(conn, welcome, now_ms)?;
            mark_processed(conn, message_id, now_ms)?;
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
    let events = handle_protocol(conn, &name, &group_id, &mut group, pm, now_ms, downloads)?;
    mark_processed(conn, message_id, now_ms)?;
    cache.put(group_id, group);
    Ok(events)
}

/// Joins from a Welcome; returns the events and the group.
fn join(
    tx: &Connection,
    welcome: openmls::prelude::Welcome,
    now_ms: u64,
) -> Result<(Vec<Event>, MlsGroup), GroupError> {
    let provider = Provider::new(tx);
    let processed = ProcessedWelcome::new_from_welcome(&provider, &join_config(), welcome)
        .map_err(welcome_error)?;
    let staged = processed
        .into_staged_welcome(&provider, None)
        .map_err(welcome_error)?;
    let by = staged
        .welcome_sender()
        .map(|l| username_of(l.credential()))
        .unwrap_or_default();
    let g = staged.into_group(&provider).map_err(welcome_error)?;
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
    // openmls refuses a Welcome for a group it stores (`welcome_error`);
    // this covers our own table.
    if name_by_group_id(tx, &group_id)?.is_some() {
        return Err(GroupError::AlreadyJoined);
    }
    let name = unique_name(tx, &wanted)?;
    insert_group(tx, &group_id, &name, now_ms)?;
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

/// `wanted` if no local group has that name, else `wanted-2`, `wanted-3`...
/// (`group` if `wanted` is not a valid name).
fn unique_name(conn: &Connection, wanted: &str) -> Result<String, GroupError> {
    let base = if valid_group_name(wanted) {
        wanted.to_string()
    } else {
        "group".to_string()
    };
    let mut name = base.clone();
    let mut n = 2;
    while name_taken(conn, &name)? {
        name = format!("{base}-{n}");
        n += 1;
    }
    Ok(name)
}

/// What a Welcome that openmls refused means for us, from openmls's typed
/// error (no text is matched).
///
/// A Welcome that names none of our key packages
/// ([`WelcomeError::NoMatchingKeyPackage`]), or names one of ours under
/// another ciphersuite than that package's
/// ([`WelcomeError::CiphersuiteMismatch`]), was not made for a package we
/// published: it is not for us.  A Welcome for a group we store already
/// ([`WelcomeError::GroupAlreadyExists`]: a redelivery, which a last-resort
/// key package lets get this far) is [`GroupError::AlreadyJoined`].  Any
/// other failure is a Welcome for us that fails validation.
fn welcome_error<S>(e: WelcomeError<S>) -> GroupError
where
    WelcomeError<S>: std::fmt::Display,
{
    match e {
        WelcomeError::NoMatchingKeyPackage | WelcomeError::CiphersuiteMismatch => {
            GroupError::WelcomeNotForUs
        }
        WelcomeError::GroupAlreadyExists => GroupError::AlreadyJoined,
        e => GroupError::rejected(e),
    }
}

/// Processes a commit, proposal or application message for `g` (active);
/// a file it carries is saved in `downloads`.
fn handle_protocol(
    tx: &Connection,
    name: &str,
    group_id: &[u8],
    g: &mut MlsGroup,
    pm: ProtocolMessage,
    now_ms: u64,
    downloads: &Path,
) -> Result<Vec<Event>, GroupError> {
    let provider = Provider::new(tx);
    let processed = g
        .process_message(&provider, pm)
        .map_err(GroupError::rejected)?;
    let by = username_of(processed.credential());
    let sender_key = match processed.sender() {
        Sender::Member(idx) => g
            .members()
            .find(|m| m.index == *idx)
            .and_then(|m| member_key(&m)),
        _ => None,
    };
    let at = Received {
        tx,
        name,
        group_id,
        by,
        now_ms,
        downloads,
    };
    match processed.into_content() {
        ProcessedMessageContent::ApplicationMessage(app) => {
            let sender_key = sender_key.ok_or_else(|| {
                GroupError::Rejected("application message from a non-member".into())
            })?;
            receive_application(&at, sender_key, &app.into_bytes())
        }
        ProcessedMessageContent::ProposalMessage(p) => {
            g.store_pending_proposal(provider.storage(), *p)
                .map_err(GroupError::mls)?;
            Ok(vec![Event::ProposalsPending {
                group: name.to_string(),
                group_id: group_id.to_vec(),
            }])
        }
        ProcessedMessageContent::StagedCommitMessage(sc) => apply_commit(&at, &provider, g, *sc),
        _ => Ok(Vec::new()),
    }
}

/// Where and from whom a processed message came.
struct Received<'a> {
    tx: &'a Connection,
    /// the group's local name
    name: &'a str,
    group_id: &'a [u8],
    /// the sender's username
    by: String,
    now_ms: u64,
    /// where a received file goes
    downloads: &'a Path,
}

/// An application message from `sender_key`: a text goes into the history
/// (once), a file into the download directory and the history (once), a
/// peer address into the peer table.
fn receive_application(
    at: &Received<'_>,
    sender_key: IdentityKey,
    bytes: &[u8],
) -> Result<Vec<Event>, GroupError> {
    let m = AppMessage::decode(bytes)?;
    let (text, file) = match m.content {
        Content::Text { text } => (text, None),
        Content::PeerAddress {
            endpoint_id,
            addrs,
            relay_url,
        } => {
            let peer = PeerInfo::from_content(&endpoint_id, &addrs, relay_url.as_deref())?;
            store_peer(at.tx, sender_key, &peer, at.now_ms)?;
            return Ok(vec![Event::PeerAnnounced {
                group: at.name.to_string(),
                member: at.by.clone(),
                key: sender_key,
                endpoint_id: peer.endpoint_id,
            }]);
        }
        Content::DeliveryToken { token } => {
            store_delivery_token(at.tx, sender_key, &token_from_hex(&token)?, at.now_ms)?;
            return Ok(vec![Event::DeliveryTokenAnnounced {
                group: at.name.to_string(),
                member: at.by.clone(),
                key: sender_key,
            }]);
        }
        Content::File {
            name,
            media_type,
            size,
            sha256,
            content,
        } => {
            // A message id this group's history holds already (a sender
            // repeating one) writes no second file.
            if has_message(at.tx, at.group_id, &m.id)? {
                return Ok(Vec::new());
            }
            let info = receive_file(at.downloads, &name, &media_type, size, &sha256, &content.0);
            (info.summary(), Some(info))
        }
        _ => ("[unsupported content]".to_string(), None),
    };
    let stored = StoredMessage {
        group: at.name.to_string(),
        sender: at.by.clone(),
        sender_key,
        sent_at_ms: m.ts,
        received_at_ms: at.now_ms,
        text,
        message_id: m.id,
        file,
    };
    Ok(if insert_message(at.tx, at.group_id, &stored, false)? {
        vec![Event::Message(stored)]
    } else {
        Vec::new()
    })
}

/// A received file: checked against what the sender declared, then saved in
/// `downloads` under its safe name (never over an existing file).  A file
/// that fails a check is refused and nothing is written; one that cannot be
/// written is reported so.  Either way the message is kept in the history,
/// so the user learns of it.
fn receive_file(
    downloads: &Path,
    name: &str,
    media_type: &str,
    size: u64,
    sha256: &str,
    content: &[u8],
) -> FileInfo {
    let status = match file::check(size, sha256, content) {
        Err(refusal) => FileStatus::Refused {
            reason: refusal.to_string(),
        },
        Ok(()) => match file::save(downloads, name, content) {
            Ok(path) => FileStatus::Saved { path },
            Err(e) => FileStatus::NotSaved {
                reason: e.to_string(),
            },
        },
    };
    FileInfo {
        name: file::sanitize_name(name),
        media_type: file::sanitize_media_type(media_type),
        size: u64::try_from(content.len()).unwrap_or(u64::MAX),
        sha256: file::sha256_hex(content),
        status,
    }
}

/// Merges a commit, after checking that every leaf it brings in (added
/// members, updated leaves, the committer's new path leaf) carries a strong
/// key; returns who was added, removed or updated their keys.
fn apply_commit(
    at: &Received<'_>,
    provider: &Provider<'_>,
    g: &mut MlsGroup,
    sc: StagedCommit,
) -> Result<Vec<Event>, GroupError> {
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
    let self_removed = sc.self_removed();
    let updated = sc.update_path_leaf_node().is_some() && added.is_empty() && removed.is_empty();
    g.merge_staged_commit(provider, sc)
        .map_err(GroupError::rejected)?;
    // Another member's commit won the epoch: a commit of ours pending in
    // it is discarded (openmls cleared it in the merge).
    pending::forget(at.tx, at.group_id)?;
    let (group, by) = (at.name.to_string(), at.by.clone());
    let mut events = Vec::new();
    if !added.is_empty() {
        events.push(Event::MembersAdded {
            group: group.clone(),
            by: by.clone(),
            members: added,
        });
    }
    if self_removed {
        events.push(Event::Removed {
            group: group.clone(),
            by: by.clone(),
        });
    } else if !removed.is_empty() {
        events.push(Event::MembersRemoved {
            group: group.clone(),
            by: by.clone(),
            members: removed,
        });
    }
    if updated {
        events.push(Event::KeyUpdated { group, by });
    }
    Ok(events)
}
