//! Verified contacts: the identity key the user confirmed for a username
//! after comparing safety numbers, and the check that a verified contact
//! still has that key in every group.

use rusqlite::{OptionalExtension, params};

use super::Profile;
use super::db::sql_int;
use crate::error::StateError;
use crate::group::{GroupError, MemberInfo};
use crate::identity::IdentityKey;
use crate::safety::SafetyNumber;

/// Whether a contact's key is the one the user verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verification {
    /// never verified
    Unverified,
    /// verified, and this is the verified key
    Verified,
    /// verified with another key: this key is not the one the user checked
    Changed {
        /// the key the user verified
        verified: IdentityKey,
    },
}

/// A contact as the user checks them: a username, the identity key seen
/// for it, their safety number with us, and whether the user verified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    /// the username
    pub username: String,
    /// the identity key
    pub key: IdentityKey,
    /// our safety number with this username and key
    pub safety_number: SafetyNumber,
    /// whether this is the key the user verified
    pub verification: Verification,
}

impl Profile {
    /// `username` with `key` as a contact.
    pub fn contact(&self, username: &str, key: IdentityKey) -> Result<Contact, StateError> {
        Ok(Contact {
            username: username.to_string(),
            safety_number: self.safety_number(username, &key),
            verification: self.verification(username, &key)?,
            key,
        })
    }

    /// The contacts named `username` in our groups: one per distinct
    /// identity key (more than one means someone claims another's name);
    /// none when we share no group with them.
    pub fn contacts_named(&self, username: &str) -> Result<Vec<Contact>, GroupError> {
        self.contact_keys(username)?
            .into_iter()
            .map(|k| Ok(self.contact(username, k)?))
            .collect()
    }

    /// The safety number of this profile and `username` with `key`.
    pub fn safety_number(&self, username: &str, key: &IdentityKey) -> SafetyNumber {
        SafetyNumber::of((self.username(), &self.identity_key()), (username, key))
    }

    /// Records that the user verified `key` as `username`'s identity key
    /// (replacing an earlier verification of that username).
    pub fn mark_verified(&mut self, username: &str, key: &IdentityKey) -> Result<(), StateError> {
        let now = self.clock.unix_ms();
        self.conn
            .prepare_cached(
                "INSERT INTO verified (username, identity, verified_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (username) DO UPDATE SET identity = ?2, verified_at = ?3",
            )
            .and_then(|mut s| s.execute(params![username, key.as_bytes(), sql_int(now)]))?;
        Ok(())
    }

    /// Forgets the verification of `username`.
    pub fn unmark_verified(&mut self, username: &str) -> Result<(), StateError> {
        self.conn
            .execute("DELETE FROM verified WHERE username = ?1", [username])?;
        Ok(())
    }

    /// Whether `key` is the key the user verified for `username`.
    pub fn verification(
        &self,
        username: &str,
        key: &IdentityKey,
    ) -> Result<Verification, StateError> {
        let row: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT identity FROM verified WHERE username = ?1",
                [username],
                |r| r.get(0),
            )
            .optional()?;
        let Some(bytes) = row else {
            return Ok(Verification::Unverified);
        };
        let verified = IdentityKey::from_slice(&bytes)
            .map_err(|_| StateError::Damaged("a verified contact's key".into()))?;
        Ok(if verified == *key {
            Verification::Verified
        } else {
            Verification::Changed { verified }
        })
    }

    /// The members of `group` whose credential names a verified contact but
    /// whose key is not the verified one, each with the verified key.
    pub fn verified_key_changes(
        &self,
        group: &str,
    ) -> Result<Vec<(MemberInfo, IdentityKey)>, GroupError> {
        let mut changed = Vec::new();
        for m in self.members(group)?.into_iter().filter(|m| !m.is_self) {
            if let Verification::Changed { verified } = self.verification(&m.username, &m.key)? {
                changed.push((m, verified));
            }
        }
        Ok(changed)
    }

    /// The distinct identity keys that members of our groups named
    /// `username` have (more than one: someone claims another's name).
    fn contact_keys(&self, username: &str) -> Result<Vec<IdentityKey>, GroupError> {
        let mut keys = Vec::new();
        for g in self.groups()? {
            for m in self.members(&g.name)? {
                if !m.is_self && m.username == username && !keys.contains(&m.key) {
                    keys.push(m.key);
                }
            }
        }
        Ok(keys)
    }
}
