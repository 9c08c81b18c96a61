//! How old this member's own keys are in each group, for automatic key
//! updates: the messages it sent since its last update (or since it
//! created or joined the group), and when that was.  The client commits an
//! MLS self-update when either passes the policy's limit, so a member whose
//! keys were stolen is healed without anyone remembering to type `update`.

use rusqlite::{Connection, params};

use super::Profile;
use super::db::sql_int;
use super::groups::group_id_by_name;
use crate::error::StateError;
use crate::group::GroupError;

/// When a member refreshes its keys in a group by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyUpdatePolicy {
    /// after this many messages sent since the last update
    pub after_messages: u64,
    /// or after this long (milliseconds), plus a per-group delay of up to a
    /// tenth of it, so members who joined together do not all commit at once
    pub after_ms: u64,
}

impl KeyUpdatePolicy {
    /// 100 messages or 7 days (Megolm's rotation defaults; MLS updates also
    /// heal a compromise).
    pub const DEFAULT: Self = Self {
        after_messages: 100,
        after_ms: 7 * 24 * 3_600_000,
    };

    const MESSAGES_KEY: &'static str = "key_update_after_messages";
    const AGE_KEY: &'static str = "key_update_after_ms";
}

impl Default for KeyUpdatePolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Counts one message sent by us in `group_id` (same transaction as the
/// message itself).
pub(super) fn count_sent(conn: &Connection, group_id: &[u8]) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(
        "INSERT INTO key_updates (group_id, updated_at, sent_since)
             SELECT group_id, created_at, 1 FROM groups WHERE group_id = ?1
         ON CONFLICT (group_id) DO UPDATE SET sent_since = sent_since + 1",
    )?
    .execute([group_id])?;
    Ok(())
}

impl Profile {
    /// The automatic key-update policy (stored in the profile; the default
    /// until set).
    pub fn key_update_policy(&self) -> Result<KeyUpdatePolicy, StateError> {
        let read = |key: &str| -> Result<Option<u64>, StateError> {
            Ok(self
                .setting(key)?
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map(u64::from_le_bytes))
        };
        let d = KeyUpdatePolicy::DEFAULT;
        Ok(KeyUpdatePolicy {
            after_messages: read(KeyUpdatePolicy::MESSAGES_KEY)?.unwrap_or(d.after_messages),
            after_ms: read(KeyUpdatePolicy::AGE_KEY)?.unwrap_or(d.after_ms),
        })
    }

    /// Sets the automatic key-update policy.
    pub fn set_key_update_policy(&self, p: KeyUpdatePolicy) -> Result<(), StateError> {
        self.set_setting(
            KeyUpdatePolicy::MESSAGES_KEY,
            &p.after_messages.to_le_bytes(),
        )?;
        self.set_setting(KeyUpdatePolicy::AGE_KEY, &p.after_ms.to_le_bytes())
    }

    /// Records that our keys in `group` were just refreshed (our
    /// self-update commit was accepted and merged).
    pub fn record_key_update(&self, group: &str) -> Result<(), GroupError> {
        let group_id = group_id_by_name(&self.conn, group)?;
        self.conn
            .prepare_cached(
                "INSERT INTO key_updates (group_id, updated_at, sent_since) VALUES (?1, ?2, 0)
                 ON CONFLICT (group_id) DO UPDATE SET updated_at = ?2, sent_since = 0",
            )?
            .execute(params![group_id, sql_int(self.clock.unix_ms())])?;
        Ok(())
    }

    /// The groups where our keys are due for an update under `policy`.
    pub fn key_updates_due(&self, policy: KeyUpdatePolicy) -> Result<Vec<String>, StateError> {
        let now = self.clock.unix_ms();
        let me = self.identity_key();
        let mut stmt = self.conn.prepare_cached(
            "SELECT g.name, g.group_id, COALESCE(k.updated_at, g.created_at), COALESCE(k.sent_since, 0)
             FROM groups g LEFT JOIN key_updates k ON k.group_id = g.group_id
             ORDER BY g.name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut due = Vec::new();
        for row in rows {
            let (name, group_id, updated_at, sent) = row?;
            let updated_at = u64::try_from(updated_at).unwrap_or(0);
            let sent = u64::try_from(sent).unwrap_or(0);
            let age_limit = policy.after_ms.saturating_add(spread(
                me.as_bytes(),
                &group_id,
                policy.after_ms / 10,
            ));
            if sent >= policy.after_messages || now.saturating_sub(updated_at) >= age_limit {
                due.push(name);
            }
        }
        Ok(due)
    }
}

/// A delay in `[0, max)` fixed per member and group (from a hash of both),
/// so the members of a group come due at different times.
fn spread(me: &[u8], group_id: &[u8], max: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(me);
    ctx.update(group_id);
    let h = ctx.finish();
    let mut b = [0u8; 8];
    b.copy_from_slice(h.as_ref().get(..8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(b) % max
}
