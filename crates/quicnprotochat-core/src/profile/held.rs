//! Held messages: protocol messages that could not be processed when they
//! arrived but may be later.  A message from an epoch this profile has not
//! reached yet (its commit is still on the way, or is a commit of ours not
//! merged yet), or for a group whose Welcome has not arrived, is kept here
//! instead of being dropped, and processed again after its group's epoch
//! changes or the group is joined (messages of a group this profile left
//! are not kept).  The hold is bounded ([`MAX_HELD`]
//! messages, each kept at most [`HELD_MAX_AGE_MS`]); a message that can
//! never be processed (its epoch is past) is dropped.  Either way the
//! application gets an [`Event::Undecryptable`].

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::Profile;
use super::db::sql_int;
use super::groups::{group_id_by_name, name_by_group_id};
use super::process::process_in;
use super::transaction::{GroupCache, begin, commit};
use crate::group::{Event, GroupError};
use crate::mls_header::{self, FrameKind};

/// Messages held at most; past it an undecryptable message is dropped.
pub const MAX_HELD: u64 = 256;

/// How long a message is held at most: seven days, the server's default
/// window for recognising a message id it has seen.
pub const HELD_MAX_AGE_MS: u64 = 7 * 24 * 3600 * 1000;

impl Profile {
    /// Messages held for a retry (see [`Event::Undecryptable`]).
    pub fn held_count(&self) -> Result<u64, GroupError> {
        count(&self.conn)
    }

    /// Tries the held messages of every group again (one transaction):
    /// after a commit of ours was merged, or when an earlier run stopped
    /// before it could.  Returns the events of those that now apply.
    pub fn retry_held(&mut self) -> Result<Vec<Event>, GroupError> {
        let now_ms = self.clock.unix_ms();
        let tx = begin(&mut self.conn, &mut self.cache)?;
        let downloads = self.downloads.as_path();
        let groups: Vec<Vec<u8>> = tx
            .prepare_cached("SELECT DISTINCT group_id FROM held")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut events = Vec::new();
        for g in groups {
            match retry(&tx, &mut self.cache, &g, now_ms, downloads) {
                Ok(more) => events.extend(more),
                Err(e) => {
                    self.cache.clear();
                    return Err(e);
                }
            }
        }
        commit(tx, &mut self.cache)?;
        Ok(events)
    }
}

fn count(conn: &Connection) -> Result<u64, GroupError> {
    let n: i64 = conn
        .prepare_cached("SELECT count(*) FROM held")?
        .query_row([], |r| r.get(0))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// After `err` refused the message `payload`: keeps it when it may apply
/// later (a protocol message for a group we are not in yet, or from an
/// epoch ahead of ours) and the hold has room.  `None` when the failure is
/// not about decryption (garbage, a Welcome, a message after our removal).
pub(super) fn hold(
    conn: &Connection,
    cache: &mut GroupCache,
    message_id: &[u8],
    payload: &[u8],
    err: &GroupError,
    now_ms: u64,
) -> Result<Option<Event>, GroupError> {
    if !matches!(err, GroupError::Rejected(_) | GroupError::UnknownGroup) {
        return Ok(None);
    }
    let frame = mls_header::inspect(payload);
    let (Some(group_id), Some(epoch)) = (frame.group_id, frame.epoch) else {
        return Ok(None);
    };
    if !matches!(
        frame.kind,
        FrameKind::Application | FrameKind::Commit | FrameKind::Proposal
    ) {
        return Ok(None);
    }
    conn.prepare_cached("DELETE FROM held WHERE held_at < ?1")?
        .execute([sql_int(now_ms.saturating_sub(HELD_MAX_AGE_MS))])?;
    let group = name_by_group_id(conn, &group_id)?;
    if group.is_none() && left(conn, &group_id)? {
        // A group we left: the others have not processed our leaving yet.
        return Ok(None);
    }
    let ahead = match &group {
        None => true,
        Some(_) => {
            let g = cache.take(conn, &group_id)?;
            let current = g.epoch().as_u64();
            cache.put(group_id.clone(), g);
            epoch > current
        }
    };
    let held = count(conn)?;
    let kept = ahead && held < MAX_HELD;
    if kept {
        conn.prepare_cached(
            "INSERT OR IGNORE INTO held (message_id, group_id, epoch, payload, held_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            message_id,
            group_id,
            sql_int(epoch),
            payload,
            sql_int(now_ms)
        ])?;
    }
    Ok(Some(Event::Undecryptable {
        group,
        kept,
        held: count(conn)?,
    }))
}

/// The group whose held messages may apply after `payload` was processed:
/// a commit's group (its epoch moved) or the group a Welcome joined.
pub(super) fn changed_group(
    conn: &Connection,
    payload: &[u8],
    events: &[Event],
) -> Result<Option<Vec<u8>>, GroupError> {
    let frame = mls_header::inspect(payload);
    match frame.kind {
        FrameKind::Commit => Ok(frame.group_id),
        FrameKind::Welcome => match events.iter().find_map(|e| match e {
            Event::Joined { group, .. } => Some(group),
            _ => None,
        }) {
            Some(name) => Ok(Some(group_id_by_name(conn, name)?)),
            None => Ok(None),
        },
        _ => Ok(None),
    }
}

/// Processes the held messages of `group_id` again, oldest first, until a
/// round applies none (a held commit may open the way for the next); drops
/// those whose epoch is now past.  Each attempt runs in a savepoint: one
/// that fails again changes nothing.  Files among them are saved in
/// `downloads`.
pub(super) fn retry(
    conn: &Connection,
    cache: &mut GroupCache,
    group_id: &[u8],
    now_ms: u64,
    downloads: &Path,
) -> Result<Vec<Event>, GroupError> {
    let mut events = Vec::new();
    // Every round but the last applies at least one held message.
    for _ in 0..=MAX_HELD {
        let rows: Vec<(i64, Vec<u8>, Vec<u8>)> = conn
            .prepare_cached(
                "SELECT id, message_id, payload FROM held WHERE group_id = ?1 ORDER BY id",
            )?
            .query_map([group_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let mut applied = false;
        for (id, message_id, payload) in rows {
            conn.execute_batch("SAVEPOINT held_retry")?;
            match process_in(conn, cache, &message_id, &payload, now_ms, downloads) {
                Ok(more) => {
                    conn.prepare_cached("DELETE FROM held WHERE id = ?1")?
                        .execute([id])?;
                    conn.execute_batch("RELEASE held_retry")?;
                    events.extend(more);
                    applied = true;
                }
                Err(e @ GroupError::State(_)) => return Err(e),
                Err(_) => conn.execute_batch("ROLLBACK TO held_retry; RELEASE held_retry")?,
            }
        }
        if !applied {
            break;
        }
    }
    // What needs an epoch we have passed can never apply.
    let current = match cache.take(conn, group_id) {
        Ok(g) => {
            let e = g.epoch().as_u64();
            cache.put(group_id.to_vec(), g);
            Some(e)
        }
        Err(GroupError::UnknownGroup) => None,
        Err(e) => return Err(e),
    };
    if let Some(current) = current {
        conn.prepare_cached("DELETE FROM held WHERE group_id = ?1 AND epoch < ?2")?
            .execute(params![group_id, sql_int(current)])?;
    }
    Ok(events)
}

/// Whether this profile left the group `group_id`.
fn left(conn: &Connection, group_id: &[u8]) -> Result<bool, GroupError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM left_groups WHERE group_id = ?1")?
        .query_row([group_id], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Whether `group_id` has held messages.
pub(super) fn any(conn: &Connection, group_id: &[u8]) -> Result<bool, GroupError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM held WHERE group_id = ?1 LIMIT 1")?
        .query_row([group_id], |_| Ok(()))
        .optional()?
        .is_some())
}
