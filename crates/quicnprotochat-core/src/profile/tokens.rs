//! Delivery tokens (protocol section 9.10): this client's own, which the
//! server knows only by its hash, announced inside our groups; and those
//! members announced to us, which the client presents when it sends them
//! messages, so the server counts those messages as a member's and not a
//! stranger's.

use openmls::prelude::MlsGroup;
use rusqlite::{Connection, OptionalExtension, params};

use super::Profile;
use super::db::sql_int;
use super::mls::{member_key, username_of};
use super::transaction::Target;
use crate::group::{GroupError, Outgoing, message_id_at};
use crate::identity::IdentityKey;
use crate::message::{AppMessage, DELIVERY_TOKEN_LEN};

/// Profile setting holding this client's own delivery token.
const OWN_TOKEN: &str = "delivery_token";

impl Profile {
    /// This client's delivery token, made (32 random bytes) on first use.
    pub fn delivery_token(&self) -> Result<[u8; DELIVERY_TOKEN_LEN], GroupError> {
        if let Some(t) = self.setting(OWN_TOKEN)?
            && let Ok(token) = <[u8; DELIVERY_TOKEN_LEN]>::try_from(t.as_slice())
        {
            return Ok(token);
        }
        let mut token = [0u8; DELIVERY_TOKEN_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut token)
            .map_err(|_| GroupError::Rng)?;
        self.set_setting(OWN_TOKEN, &token)?;
        Ok(token)
    }

    /// Encrypts an announcement of our delivery token in `group`, addressed
    /// to the members named in `only` (every other member when `None`);
    /// none when nobody is left to tell.
    pub fn announce_delivery_token(
        &mut self,
        group: &str,
        only: Option<&[String]>,
    ) -> Result<Option<Outgoing>, GroupError> {
        let token = self.delivery_token()?;
        self.with_group(Target::Name(group), |op, g| {
            let recipients = addressed(g, op.me(), only);
            if !g.is_active() || recipients.is_empty() {
                return Ok(None);
            }
            let id = message_id_at(op.now_ms)?;
            let body = AppMessage::delivery_token(id, op.now_ms, &token).encode()?;
            op.encrypt(g, recipients, id, &body).map(Some)
        })
    }

    /// Every delivery token members announced to us, by identity.
    pub fn delivery_tokens(
        &self,
    ) -> Result<Vec<(IdentityKey, [u8; DELIVERY_TOKEN_LEN])>, GroupError> {
        let rows: Vec<(Vec<u8>, Vec<u8>)> = self
            .conn
            .prepare("SELECT identity, token FROM delivery_tokens")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(k, t)| Some((IdentityKey::from_slice(&k).ok()?, t.try_into().ok()?)))
            .collect())
    }

    /// The delivery token `member` announced to us, if any.
    pub fn delivery_token_of(
        &self,
        member: IdentityKey,
    ) -> Result<Option<[u8; DELIVERY_TOKEN_LEN]>, GroupError> {
        let t: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT token FROM delivery_tokens WHERE identity = ?1",
                [member.as_bytes()],
                |r| r.get(0),
            )
            .optional()?;
        Ok(t.and_then(|t| t.try_into().ok()))
    }
}

/// The members of `g` other than `me`, or those of them named in `only`.
fn addressed(g: &MlsGroup, me: IdentityKey, only: Option<&[String]>) -> Vec<IdentityKey> {
    g.members()
        .filter(|m| only.is_none_or(|names| names.contains(&username_of(&m.credential))))
        .filter_map(|m| member_key(&m))
        .filter(|k| *k != me)
        .collect()
}

/// Records the delivery token the member with identity `key` announced.
pub(super) fn store_delivery_token(
    conn: &Connection,
    key: IdentityKey,
    token: &[u8; DELIVERY_TOKEN_LEN],
    now_ms: u64,
) -> Result<(), GroupError> {
    conn.execute(
        "INSERT INTO delivery_tokens (identity, token, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (identity) DO UPDATE SET token = excluded.token, updated_at = excluded.updated_at",
        params![key.as_bytes(), &token[..], sql_int(now_ms)],
    )?;
    Ok(())
}
