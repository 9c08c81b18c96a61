//! What a profile remembers of its groups: message history, the group
//! list, members, and the ids of processed messages (bounded by
//! [`PROCESSED_HORIZON_MS`]).

use rusqlite::{Connection, OptionalExtension, params};

use super::Profile;
use super::db::sql_int;
use super::groups::group_id_by_name;
use super::mls::{member_key, others, username_of};
use super::transaction::load;
use crate::error::StateError;
use crate::file::{FileInfo, FileStatus};
use crate::group::{
    GroupError, GroupSummary, MESSAGE_ID_TIME_BYTES, MemberInfo, PROCESSED_HORIZON_MS,
    StoredMessage,
};
use crate::identity::IdentityKey;

impl Profile {
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
                "SELECT ?3, sender, sender_key, sent_at, received_at, body, message_id, file FROM messages
                 WHERE group_id = ?1 ORDER BY id DESC LIMIT ?2",
            )?
            .query_map(params![group_id, sql_int(limit), group], read_row)?
            .map(|row| stored_message(row?))
            .collect::<Result<_, GroupError>>()?;
        rows.reverse();
        Ok(rows)
    }

    /// Received messages not yet shown to the user, in the order they were
    /// processed, at most `limit` of them: what an application shows next
    /// time when it stopped (or lost its connection) between processing
    /// messages and showing them.  Messages of groups this profile left are
    /// not listed.
    pub fn unshown(&self, limit: usize) -> Result<Vec<StoredMessage>, GroupError> {
        self.conn
            .prepare_cached(
                "SELECT g.name, m.sender, m.sender_key, m.sent_at, m.received_at, m.body, m.message_id, m.file
                 FROM messages m JOIN groups g ON g.group_id = m.group_id
                 WHERE m.shown = 0 ORDER BY m.id LIMIT ?1",
            )?
            .query_map(params![sql_int(limit)], read_row)?
            .map(|row| stored_message(row?))
            .collect()
    }

    /// Records that `messages` were shown to the user (one transaction):
    /// [`Profile::unshown`] no longer lists them.  Call it only once they
    /// were written out.
    pub fn mark_shown(&mut self, messages: &[StoredMessage]) -> Result<(), GroupError> {
        if messages.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE messages SET shown = 1 WHERE message_id = ?1
                 AND group_id = (SELECT group_id FROM groups WHERE name = ?2)",
            )?;
            for m in messages {
                let id = hex::decode(&m.message_id).map_err(GroupError::rejected)?;
                stmt.execute(params![id, m.group])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// Stores a message in the history, `shown` or waiting to be shown;
/// `false` if it was there already.
pub(super) fn insert_message(
    conn: &Connection,
    group_id: &[u8],
    m: &StoredMessage,
    shown: bool,
) -> Result<bool, GroupError> {
    let id = hex::decode(&m.message_id).map_err(GroupError::rejected)?;
    let file = m.file.as_ref().map(file_column).transpose()?;
    let n = conn.prepare_cached(
        "INSERT OR IGNORE INTO messages (group_id, message_id, sender, sender_key, sent_at, received_at, body, shown, file)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
            group_id,
            id,
            m.sender,
            m.sender_key.as_bytes(),
            sql_int(m.sent_at_ms),
            sql_int(m.received_at_ms),
            m.text,
            shown,
            file
        ],
    )?;
    Ok(n == 1)
}

/// Whether the history of `group_id` holds the message `message_id` (hex).
pub(super) fn has_message(
    conn: &Connection,
    group_id: &[u8],
    message_id: &str,
) -> Result<bool, GroupError> {
    let id = hex::decode(message_id).map_err(GroupError::rejected)?;
    Ok(conn
        .prepare_cached("SELECT 1 FROM messages WHERE group_id = ?1 AND message_id = ?2")?
        .query_row(params![group_id, id], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Records that the message with this delivery id is processed.
pub(super) fn mark_processed(
    conn: &Connection,
    message_id: &[u8],
    now_ms: u64,
) -> Result<(), GroupError> {
    conn.prepare_cached("INSERT OR IGNORE INTO processed (message_id, at) VALUES (?1, ?2)")?
        .execute(params![message_id, sql_int(now_ms)])?;
    Ok(())
}

/// Forgets processed ids whose time part is older than the horizon: a range
/// at the start of the table's key order, so this reads only what it deletes.
/// (An id not made by [`crate::new_message_id`] sorts by its first bytes; if
/// those read as an old time it is forgotten early, which MLS covers: see
/// [`PROCESSED_HORIZON_MS`].)
pub(super) fn prune_processed(conn: &Connection, now_ms: u64) -> Result<usize, GroupError> {
    let cutoff = now_ms.saturating_sub(PROCESSED_HORIZON_MS).to_be_bytes();
    let mut bound = [0u8; 16];
    bound[..MESSAGE_ID_TIME_BYTES].copy_from_slice(&cutoff[cutoff.len() - MESSAGE_ID_TIME_BYTES..]);
    Ok(conn
        .prepare_cached("DELETE FROM processed WHERE message_id < ?1")?
        .execute([&bound[..]])?)
}

/// A stored message's columns: group name, sender, sender key, sent and
/// received times, body, message id, file.
type MessageRow = (
    String,
    String,
    Vec<u8>,
    i64,
    i64,
    String,
    Vec<u8>,
    Option<String>,
);

/// Reads the columns of [`MessageRow`], in that order.
fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MessageRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

/// A stored message from its row.
fn stored_message(row: MessageRow) -> Result<StoredMessage, GroupError> {
    let (group, sender, key, sent, received, text, id, file) = row;
    Ok(StoredMessage {
        group,
        sender,
        sender_key: IdentityKey::from_slice(&key).map_err(StateError::from)?,
        sent_at_ms: u64::try_from(sent).unwrap_or(0),
        received_at_ms: u64::try_from(received).unwrap_or(0),
        text,
        message_id: hex::encode(id),
        // A column this client cannot read leaves the summary in `text`.
        file: file.and_then(|f| {
            serde_json::from_str::<StoredFile>(&f)
                .ok()
                .map(FileInfo::from)
        }),
    })
}

/// The `file` column: a [`FileInfo`] as JSON.  Its field names and status
/// words are the profile format.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredFile {
    name: String,
    media_type: String,
    size: u64,
    sha256: String,
    /// `sent`, `saved`, `refused` or `not_saved`
    status: String,
    /// where it was saved
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    /// why it was refused or not saved
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

fn file_column(f: &FileInfo) -> Result<String, GroupError> {
    let (status, path, reason) = match &f.status {
        FileStatus::Sent => ("sent", None, None),
        FileStatus::Saved { path } => ("saved", Some(path.to_string_lossy().into_owned()), None),
        FileStatus::Refused { reason } => ("refused", None, Some(reason.clone())),
        FileStatus::NotSaved { reason } => ("not_saved", None, Some(reason.clone())),
    };
    serde_json::to_string(&StoredFile {
        name: f.name.clone(),
        media_type: f.media_type.clone(),
        size: f.size,
        sha256: f.sha256.clone(),
        status: status.into(),
        path,
        reason,
    })
    .map_err(|e| StateError::storage(e).into())
}

impl From<StoredFile> for FileInfo {
    fn from(f: StoredFile) -> Self {
        let reason = f.reason.unwrap_or_default();
        let status = match (f.status.as_str(), f.path) {
            ("sent", _) => FileStatus::Sent,
            ("saved", Some(path)) => FileStatus::Saved { path: path.into() },
            ("refused", _) => FileStatus::Refused { reason },
            _ => FileStatus::NotSaved { reason },
        };
        Self {
            name: f.name,
            media_type: f.media_type,
            size: f.size,
            sha256: f.sha256,
            status,
        }
    }
}
