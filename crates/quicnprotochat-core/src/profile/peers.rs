//! Peers: how to reach members directly (announced in their groups), and
//! which peers may connect to us.

use rusqlite::{Connection, OptionalExtension, params};

use super::Profile;
use super::db::sql_int;
use super::mls::others;
use super::transaction::{Target, load};
use crate::group::{GroupError, Outgoing, message_id_at};
use crate::identity::IdentityKey;
use crate::message::{AppMessage, PeerInfo};

impl Profile {
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
            let id = message_id_at(op.now_ms)?;
            let body = AppMessage::peer_address(id, op.now_ms, peer).encode()?;
            op.encrypt(g, recipients, id, &body).map(Some)
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
}

/// Records how to reach the member with identity `key`.
pub(super) fn store_peer(
    conn: &Connection,
    key: IdentityKey,
    peer: &PeerInfo,
    now_ms: u64,
) -> Result<(), GroupError> {
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
            sql_int(now_ms)
        ],
    )?;
    Ok(())
}
