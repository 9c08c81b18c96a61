//! Pending commits: a commit of ours that the server may have stored but
//! this profile has not merged yet.  It is recorded in the transaction that
//! creates it and forgotten in the one that merges or discards it, so a
//! client that stops in between (after the server took the commit, before
//! the merge) finds it on restart and sends it again: the message id makes
//! that send idempotent, so its answer tells whether the server has it.

use rusqlite::{Connection, OptionalExtension, params};

use super::Profile;
use super::db::sql_int;
use crate::error::StateError;
use crate::group::{CommitOutcome, GroupError, Outgoing};
use crate::identity::IdentityKey;

impl Profile {
    /// Commits of ours that are neither merged nor discarded, oldest first:
    /// send each again ([`Outgoing::message_id`] is unchanged), then
    /// confirm or abort it as the server answers.
    pub fn pending_commits(&self) -> Result<Vec<CommitOutcome>, GroupError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT group_id, commit_id, commit_to, commit_payload, welcome_id, welcome_to, welcome_payload
             FROM pending_commits ORDER BY created_at, group_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                (
                    r.get::<_, Option<Vec<u8>>>(1)?,
                    r.get::<_, Option<Vec<u8>>>(2)?,
                    r.get::<_, Option<Vec<u8>>>(3)?,
                ),
                (
                    r.get::<_, Option<Vec<u8>>>(4)?,
                    r.get::<_, Option<Vec<u8>>>(5)?,
                    r.get::<_, Option<Vec<u8>>>(6)?,
                ),
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (group_id, commit, welcome) = row?;
            out.push(CommitOutcome {
                group_id,
                commit: decode(commit)?,
                welcome: decode(welcome)?,
            });
        }
        Ok(out)
    }

    /// Whether a commit of ours is pending in the group `group_id`.
    pub fn has_pending_commit(&self, group_id: &[u8]) -> Result<bool, GroupError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM pending_commits WHERE group_id = ?1")?
            .query_row([group_id], |_| Ok(()))
            .optional()?
            .is_some())
    }
}

/// Records `outcome` as pending (in the transaction that made it).
pub(super) fn save(
    conn: &Connection,
    outcome: &CommitOutcome,
    now_ms: u64,
) -> Result<(), GroupError> {
    let (c_id, c_to, c_payload) = encode(outcome.commit.as_ref());
    let (w_id, w_to, w_payload) = encode(outcome.welcome.as_ref());
    conn.prepare_cached(
        "INSERT OR REPLACE INTO pending_commits
         (group_id, commit_id, commit_to, commit_payload, welcome_id, welcome_to, welcome_payload, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        outcome.group_id,
        c_id,
        c_to,
        c_payload,
        w_id,
        w_to,
        w_payload,
        sql_int(now_ms)
    ])?;
    Ok(())
}

/// Whether `outcome` is the commit pending in its group (not settled
/// already, nor replaced by a later one).
pub(super) fn is_pending(conn: &Connection, outcome: &CommitOutcome) -> Result<bool, GroupError> {
    let row: Option<Option<Vec<u8>>> = conn
        .prepare_cached("SELECT commit_id FROM pending_commits WHERE group_id = ?1")?
        .query_row([&outcome.group_id], |r| r.get(0))
        .optional()?;
    Ok(match row {
        Some(id) => id.as_deref() == outcome.commit.as_ref().map(|c| &c.message_id[..]),
        None => false,
    })
}

/// Forgets the pending commit of `group_id` (merged or discarded).
pub(super) fn forget(conn: &Connection, group_id: &[u8]) -> Result<(), GroupError> {
    conn.prepare_cached("DELETE FROM pending_commits WHERE group_id = ?1")?
        .execute([group_id])?;
    Ok(())
}

type Columns = (Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>);

fn encode(m: Option<&Outgoing>) -> Columns {
    match m {
        Some(m) => (
            Some(m.message_id.to_vec()),
            Some(
                m.recipients
                    .iter()
                    .flat_map(|r| r.as_bytes().to_vec())
                    .collect(),
            ),
            Some(m.payload.clone()),
        ),
        None => (None, None, None),
    }
}

fn decode(columns: Columns) -> Result<Option<Outgoing>, GroupError> {
    let damaged = || StateError::Storage("damaged pending commit".into());
    match columns {
        (Some(id), Some(to), Some(payload)) => Ok(Some(Outgoing {
            message_id: id.try_into().map_err(|_| damaged())?,
            recipients: to
                .chunks(32)
                .map(|k| IdentityKey::from_slice(k).map_err(|_| damaged()))
                .collect::<Result<_, _>>()?,
            payload,
        })),
        (None, None, None) => Ok(None),
        _ => Err(damaged().into()),
    }
}
