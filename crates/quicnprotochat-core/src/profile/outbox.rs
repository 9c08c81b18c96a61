//! The outbox: messages to send again until the server stored them (the
//! Welcomes of confirmed commits).

use rusqlite::{Connection, params};

use super::Profile;
use super::db::sql_int;
use crate::error::StateError;
use crate::group::{GroupError, Outgoing};
use crate::identity::IdentityKey;

impl Profile {
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
}

/// Puts `message` in the outbox (once: a message id already there stays as
/// it is).
pub(super) fn enqueue(
    conn: &Connection,
    message: &Outgoing,
    now_ms: u64,
) -> Result<(), GroupError> {
    let recipients: Vec<u8> = message
        .recipients
        .iter()
        .flat_map(|r| r.as_bytes().to_vec())
        .collect();
    conn.prepare_cached(
        "INSERT OR IGNORE INTO outbox (message_id, recipients, payload, created_at)
         VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        &message.message_id[..],
        recipients,
        message.payload,
        sql_int(now_ms)
    ])?;
    Ok(())
}
