//! Write transactions and the group cache.
//!
//! Every [`Profile`] operation that touches MLS groups runs in one write
//! transaction: it starts with [`begin`] (which keeps the cache honest, see
//! [`GroupCache`]) and ends with [`commit`]; [`Profile::with_group`] does
//! both around an operation on one group.  An operation that returns early
//! with an error drops its transaction, which rolls it back, and drops the
//! group it took out of the cache.

use std::collections::HashMap;

use openmls::prelude::{GroupId, MlsGroup};
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::OpenMlsProvider;
use rusqlite::{Connection, Transaction, TransactionBehavior};

use super::groups::group_id_by_name;
use super::{Profile, Provider};
use crate::error::StateError;
use crate::group::GroupError;
use crate::identity::{Identity, IdentityKey};

/// MLS groups kept in memory between operations.
///
/// openmls writes every change of a group through its storage provider as it
/// makes it, so an [`MlsGroup`] held in memory stays equal to the stored one
/// as long as every transaction that changed it committed.  The cache keeps
/// that invariant:
///
/// - a group is taken out of the cache for an operation and put back only
///   after the operation's transaction committed; a failed operation (a
///   rejected message, a storage error) drops it, and the next operation
///   loads it again from the database;
/// - every write transaction is `BEGIN IMMEDIATE` and starts by reading
///   `PRAGMA data_version`, which changes when another connection (another
///   process on the same profile) committed: then the whole cache is
///   dropped, so state written elsewhere is never overwritten with a stale
///   copy.
#[derive(Default)]
pub(super) struct GroupCache {
    groups: HashMap<Vec<u8>, MlsGroup>,
    data_version: Option<i64>,
}

impl GroupCache {
    /// Takes the group out of the cache, or loads it.
    pub(super) fn take(
        &mut self,
        conn: &Connection,
        group_id: &[u8],
    ) -> Result<MlsGroup, GroupError> {
        match self.groups.remove(group_id) {
            Some(g) => Ok(g),
            None => load(conn, group_id),
        }
    }

    /// Puts back a group whose changes are committed.
    pub(super) fn put(&mut self, group_id: Vec<u8>, group: MlsGroup) {
        self.groups.insert(group_id, group);
    }

    /// Forgets everything (a commit failed: memory may be ahead of disk).
    pub(super) fn clear(&mut self) {
        self.groups.clear();
        self.data_version = None;
    }
}

/// Starts a write transaction and drops cached groups that another
/// connection may have changed.
pub(super) fn begin<'c>(
    conn: &'c mut Connection,
    cache: &mut GroupCache,
) -> Result<Transaction<'c>, GroupError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA data_version", [], |r| r.get(0))?;
    if cache.data_version != Some(version) {
        cache.groups.clear();
        cache.data_version = Some(version);
    }
    Ok(tx)
}

/// Commits `tx`; if that fails, memory may be ahead of the database.
pub(super) fn commit(tx: Transaction<'_>, cache: &mut GroupCache) -> Result<(), GroupError> {
    tx.commit().map_err(|e| {
        cache.clear();
        GroupError::from(e)
    })
}

/// Which group an operation is on.
pub(super) enum Target<'a> {
    Name(&'a str),
    Id(&'a [u8]),
}

/// What an operation on one group gets to work with.
pub(super) struct Op<'a> {
    pub(super) tx: &'a Connection,
    pub(super) provider: Provider<'a>,
    pub(super) identity: &'a Identity,
    pub(super) username: &'a str,
    pub(super) group_id: &'a [u8],
    /// the operation's time, Unix milliseconds, read once from the
    /// profile's clock
    pub(super) now_ms: u64,
}

impl Op<'_> {
    pub(super) fn me(&self) -> IdentityKey {
        self.identity.public_key()
    }

    pub(super) fn signer(&self) -> &SignatureKeyPair {
        self.identity.key_pair()
    }
}

impl Profile {
    /// Runs `f` on one group in one write transaction; the group's state,
    /// history and bookkeeping change together or not at all.
    pub(super) fn with_group<T>(
        &mut self,
        target: Target<'_>,
        f: impl FnOnce(&Op<'_>, &mut MlsGroup) -> Result<T, GroupError>,
    ) -> Result<T, GroupError> {
        let tx = begin(&mut self.conn, &mut self.cache)?;
        let group_id = match target {
            Target::Name(name) => group_id_by_name(&tx, name)?,
            Target::Id(id) => id.to_vec(),
        };
        let mut group = self.cache.take(&tx, &group_id)?;
        let out = f(
            &Op {
                tx: &tx,
                provider: Provider::new(&tx),
                identity: &self.identity,
                username: &self.username,
                group_id: &group_id,
                now_ms: self.clock.unix_ms(),
            },
            &mut group,
        )?;
        commit(tx, &mut self.cache)?;
        self.cache.put(group_id, group);
        Ok(out)
    }
}

/// Loads a group from the database.
pub(super) fn load(conn: &Connection, group_id: &[u8]) -> Result<MlsGroup, GroupError> {
    MlsGroup::load(
        Provider::new(conn).storage(),
        &GroupId::from_slice(group_id),
    )
    .map_err(|e| GroupError::State(StateError::storage(e)))?
    .ok_or(GroupError::UnknownGroup)
}
