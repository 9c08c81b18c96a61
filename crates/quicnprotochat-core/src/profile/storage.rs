//! openmls's state in the profile: a storage provider of our own over the
//! tables of openmls's SQLite storage provider (their schema and
//! migrations stay openmls's).
//!
//! - Keys are encoded as openmls's SQLite provider encoded them with the
//!   JSON codec of earlier releases, byte for byte, so every row an earlier
//!   release wrote is where lookups find it.
//! - Values are written compactly: [`COMPACT`], then postcard.  A value
//!   that does not start with that byte is JSON written by an earlier
//!   release (JSON text starts with an ASCII character, never with it) and
//!   is still read.  The one exception is the group's join configuration,
//!   written as JSON still: its past-epoch policy deserializes only from a
//!   self-describing format (and it is small and written once).
//! - The message secrets store (the secret tree of the current epoch and,
//!   for each kept past epoch, its secret tree and member list; openmls
//!   rewrites it on every message) is kept in [`CHUNK`]-byte pieces in
//!   `mls_message_secrets`: a write compares the new encoding with the
//!   stored pieces and writes only those whose bytes changed.  Past epochs
//!   come first in the encoding and do not change between commits, so a
//!   message rewrites a piece or two of the current epoch's tree, not the
//!   whole store.
//!
//! With `rewriting` (the migration to schema 10), every value read that is
//! still JSON is written back compactly, and a message secrets store still
//! in openmls's table moves into pieces.

use openmls_traits::storage::{CURRENT_VERSION, StorageProvider, traits};
use rusqlite::{Connection, ToSql, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// First byte of a compact value.  Not a possible first byte of JSON text
/// (which starts with ASCII) nor of UTF-8 at all.
pub(super) const COMPACT: u8 = 0xC0;

/// Size of the pieces of a message secrets store: one piece and its row
/// fit one database page.
pub(super) const CHUNK: usize = 3072;

/// `provider_version` of the rows (openmls's SQLite provider's).
const VERSION: u16 = 1;

/// A storage failure.  Carries no stored bytes.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// the database
    #[error("profile database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// a JSON key or value
    #[error("MLS state (JSON): {0}")]
    Json(#[from] serde_json::Error),
    /// a compact value
    #[error("MLS state (compact encoding): {0}")]
    Compact(#[from] postcard::Error),
}

/// How a value is written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Json,
    Compact,
}

/// A key, as earlier releases encoded it.
fn json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, StorageError> {
    Ok(serde_json::to_vec(value)?)
}

/// A value in the compact encoding.
pub(super) fn compact<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, StorageError> {
    Ok(postcard::to_extend(value, vec![COMPACT])?)
}

/// Whether `bytes` are in the compact encoding.
pub(super) fn is_compact(bytes: &[u8]) -> bool {
    bytes.first() == Some(&COMPACT)
}

/// A value in either encoding.
pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StorageError> {
    match bytes.split_first() {
        Some((&COMPACT, rest)) => Ok(postcard::from_bytes(rest)?),
        _ => Ok(serde_json::from_slice(bytes)?),
    }
}

/// The profile's openmls storage, on a (borrowed) connection.
pub struct MlsStorage<'a> {
    conn: &'a Connection,
    rewriting: bool,
}

impl std::fmt::Debug for MlsStorage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MlsStorage")
    }
}

impl<'a> MlsStorage<'a> {
    /// Storage writing through `conn` (usually a transaction).
    pub fn new(conn: &'a Connection) -> Self {
        Self {
            conn,
            rewriting: false,
        }
    }

    /// Storage that writes back compactly every JSON value it reads.
    pub(super) fn rewriting(conn: &'a Connection) -> Self {
        Self {
            conn,
            rewriting: true,
        }
    }

    /// Runs a statement that writes.
    fn put(&self, sql: &str, params: &[&dyn ToSql]) -> Result<(), StorageError> {
        self.conn.prepare_cached(sql)?.execute(params)?;
        Ok(())
    }

    /// The values of `column` in the rows of `table` matching `filter`
    /// (written with `?1`, `?2`, ...), in row order; with `rewriting`, JSON
    /// ones are written back compactly when `encoding` is.
    fn values<T: Serialize + DeserializeOwned>(
        &self,
        table: &str,
        column: &str,
        filter: &str,
        params: &[&dyn ToSql],
        encoding: Encoding,
    ) -> Result<Vec<T>, StorageError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT rowid, {column} FROM {table} WHERE {filter} AND provider_version = {VERSION} ORDER BY rowid"
        ))?;
        let rows = stmt
            .query_map(params, |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(rows.len());
        for (rowid, bytes) in rows {
            let value: T = decode(&bytes)?;
            if self.rewriting && encoding == Encoding::Compact && !is_compact(&bytes) {
                self.put(
                    &format!("UPDATE {table} SET {column} = ?1 WHERE rowid = ?2"),
                    params![compact(&value)?, rowid],
                )?;
            }
            out.push(value);
        }
        Ok(out)
    }

    /// The one value of `values`, if any.
    fn value<T: Serialize + DeserializeOwned>(
        &self,
        table: &str,
        column: &str,
        filter: &str,
        params: &[&dyn ToSql],
        encoding: Encoding,
    ) -> Result<Option<T>, StorageError> {
        Ok(self
            .values(table, column, filter, params, encoding)?
            .into_iter()
            .next())
    }

    fn group_data<G: Serialize, T: Serialize + DeserializeOwned>(
        &self,
        group_id: &G,
        data_type: &str,
        encoding: Encoding,
    ) -> Result<Option<T>, StorageError> {
        self.value(
            "openmls_group_data",
            "group_data",
            "group_id = ?1 AND data_type = ?2",
            params![json(group_id)?, data_type],
            encoding,
        )
    }

    fn write_group_data<G: Serialize>(
        &self,
        group_id: &G,
        data_type: &str,
        bytes: &[u8],
    ) -> Result<(), StorageError> {
        self.put(
            "INSERT INTO openmls_group_data (group_id, data_type, group_data, provider_version)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (group_id, data_type) DO UPDATE
             SET group_data = excluded.group_data, provider_version = excluded.provider_version",
            params![json(group_id)?, data_type, bytes, VERSION],
        )
    }

    fn delete_group_data<G: Serialize>(
        &self,
        group_id: &G,
        data_type: &str,
    ) -> Result<(), StorageError> {
        self.put(
            "DELETE FROM openmls_group_data
             WHERE group_id = ?1 AND data_type = ?2 AND provider_version = ?3",
            params![json(group_id)?, data_type, VERSION],
        )
    }

    /// The message secrets store: from its pieces, or where an earlier
    /// release kept it.
    fn message_secrets_store<G: Serialize, T: Serialize + DeserializeOwned>(
        &self,
        group_id: &G,
    ) -> Result<Option<T>, StorageError> {
        let key = json(group_id)?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT bytes FROM mls_message_secrets WHERE group_id = ?1 ORDER BY chunk",
        )?;
        let mut rows = stmt.query([&key])?;
        let mut bytes = Vec::new();
        let mut found = false;
        while let Some(row) = rows.next()? {
            found = true;
            bytes.extend_from_slice(row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?);
        }
        if found {
            return decode(&bytes).map(Some);
        }
        let old: Option<T> = self.value(
            "openmls_group_data",
            "group_data",
            "group_id = ?1 AND data_type = 'message_secrets'",
            params![key],
            Encoding::Json,
        )?;
        if self.rewriting
            && let Some(store) = &old
        {
            self.write_message_secrets_store(group_id, store)?;
        }
        Ok(old)
    }

    /// Writes the pieces of the store whose bytes changed.
    fn write_message_secrets_store<G: Serialize, T: Serialize>(
        &self,
        group_id: &G,
        store: &T,
    ) -> Result<(), StorageError> {
        let key = json(group_id)?;
        let bytes = compact(store)?;
        let old = {
            let mut stmt = self.conn.prepare_cached(
                "SELECT chunk, bytes FROM mls_message_secrets WHERE group_id = ?1 ORDER BY chunk",
            )?;
            stmt.query_map([&key], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?
        };
        let mut pieces = 0i64;
        for (i, piece) in bytes.chunks(CHUNK).enumerate() {
            let chunk = i64::try_from(i).unwrap_or(i64::MAX);
            pieces = chunk + 1;
            if old
                .get(i)
                .is_some_and(|(c, b)| *c == chunk && b.as_slice() == piece)
            {
                continue;
            }
            self.put(
                "INSERT INTO mls_message_secrets (group_id, chunk, bytes) VALUES (?1, ?2, ?3)
                 ON CONFLICT (group_id, chunk) DO UPDATE SET bytes = excluded.bytes",
                params![key, chunk, piece],
            )?;
        }
        if old.last().is_some_and(|(c, _)| *c >= pieces) {
            self.put(
                "DELETE FROM mls_message_secrets WHERE group_id = ?1 AND chunk >= ?2",
                params![key, pieces],
            )?;
        }
        // Where an earlier release kept it (no row after the migration).
        self.delete_group_data(group_id, "message_secrets")
    }

    fn delete_message_secrets_store<G: Serialize>(&self, group_id: &G) -> Result<(), StorageError> {
        self.put(
            "DELETE FROM mls_message_secrets WHERE group_id = ?1",
            params![json(group_id)?],
        )?;
        self.delete_group_data(group_id, "message_secrets")
    }
}

impl StorageProvider<CURRENT_VERSION> for MlsStorage<'_> {
    type Error = StorageError;

    fn write_mls_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        config: &MlsGroupJoinConfig,
    ) -> Result<(), StorageError> {
        // JSON: its past-epoch policy deserializes only from a self-describing
        // format.
        self.write_group_data(group_id, "join_group_config", &json(config)?)
    }

    fn append_own_leaf_node<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        leaf_node: &LeafNode,
    ) -> Result<(), StorageError> {
        self.conn
            .prepare_cached(
                "INSERT INTO openmls_own_leaf_nodes (group_id, leaf_node, provider_version)
                 VALUES (?1, ?2, ?3)",
            )?
            .execute(params![json(group_id)?, compact(leaf_node)?, VERSION])?;
        Ok(())
    }

    fn queue_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
        proposal: &QueuedProposal,
    ) -> Result<(), StorageError> {
        // The reference is a key too (`remove_proposal`): JSON.
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO openmls_proposals (group_id, proposal_ref, proposal, provider_version)
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![json(group_id)?, json(proposal_ref)?, compact(proposal)?, VERSION])?;
        Ok(())
    }

    fn write_tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        tree: &TreeSync,
    ) -> Result<(), StorageError> {
        self.write_group_data(group_id, "tree", &compact(tree)?)
    }

    fn write_interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        interim_transcript_hash: &InterimTranscriptHash,
    ) -> Result<(), StorageError> {
        self.write_group_data(
            group_id,
            "interim_transcript_hash",
            &compact(interim_transcript_hash)?,
        )
    }

    fn write_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_context: &GroupContext,
    ) -> Result<(), StorageError> {
        self.write_group_data(group_id, "context", &compact(group_context)?)
    }

    fn write_confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        confirmation_tag: &ConfirmationTag,
    ) -> Result<(), StorageError> {
        self.write_group_data(group_id, "confirmation_tag", &compact(confirmation_tag)?)
    }

    fn write_group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_state: &GroupState,
    ) -> Result<(), StorageError> {
        self.write_group_data(group_id, "group_state", &compact(group_state)?)
    }

    fn write_message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        message_secrets: &MessageSecrets,
    ) -> Result<(), StorageError> {
        self.write_message_secrets_store(group_id, message_secrets)
    }

    fn write_resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        resumption_psk_store: &ResumptionPskStore,
    ) -> Result<(), StorageError> {
        self.write_group_data(
            group_id,
            "resumption_psk_store",
            &compact(resumption_psk_store)?,
        )
    }

    fn write_own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        own_leaf_index: &LeafNodeIndex,
    ) -> Result<(), StorageError> {
        self.write_group_data(group_id, "own_leaf_index", &compact(own_leaf_index)?)
    }

    fn write_group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_epoch_secrets: &GroupEpochSecrets,
    ) -> Result<(), StorageError> {
        self.write_group_data(
            group_id,
            "group_epoch_secrets",
            &compact(group_epoch_secrets)?,
        )
    }

    fn write_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
        signature_key_pair: &SignatureKeyPair,
    ) -> Result<(), StorageError> {
        self.put(
            "INSERT OR REPLACE INTO openmls_signature_keys (public_key, signature_key, provider_version)
             VALUES (?1, ?2, ?3)",
            params![json(public_key)?, compact(signature_key_pair)?, VERSION],
        )
    }

    fn write_encryption_key_pair<
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
        key_pair: &HpkeKeyPair,
    ) -> Result<(), StorageError> {
        self.put(
            "INSERT OR REPLACE INTO openmls_encryption_keys (public_key, key_pair, provider_version)
             VALUES (?1, ?2, ?3)",
            params![json(public_key)?, compact(key_pair)?, VERSION],
        )
    }

    fn write_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
        key_pairs: &[HpkeKeyPair],
    ) -> Result<(), StorageError> {
        self.put(
            "INSERT OR REPLACE INTO openmls_epoch_keys_pairs (group_id, epoch_id, leaf_index, key_pairs, provider_version)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![json(group_id)?, json(epoch)?, leaf_index, compact(&key_pairs)?, VERSION],
        )
    }

    fn write_key_package<
        HashReference: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &HashReference,
        key_package: &KeyPackage,
    ) -> Result<(), StorageError> {
        self.put(
            "INSERT OR REPLACE INTO openmls_key_packages (key_package_ref, key_package, provider_version)
             VALUES (?1, ?2, ?3)",
            params![json(hash_ref)?, compact(key_package)?, VERSION],
        )
    }

    fn write_psk<
        PskId: traits::PskId<CURRENT_VERSION>,
        PskBundle: traits::PskBundle<CURRENT_VERSION>,
    >(
        &self,
        psk_id: &PskId,
        psk: &PskBundle,
    ) -> Result<(), StorageError> {
        self.put(
            "INSERT OR REPLACE INTO openmls_psks (psk_id, psk_bundle, provider_version)
             VALUES (?1, ?2, ?3)",
            params![json(psk_id)?, compact(psk)?, VERSION],
        )
    }

    fn mls_group_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MlsGroupJoinConfig>, StorageError> {
        self.group_data(group_id, "join_group_config", Encoding::Json)
    }

    fn own_leaf_nodes<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<LeafNode>, StorageError> {
        self.values(
            "openmls_own_leaf_nodes",
            "leaf_node",
            "group_id = ?1",
            params![json(group_id)?],
            Encoding::Compact,
        )
    }

    fn queued_proposal_refs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<ProposalRef>, StorageError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT proposal_ref FROM openmls_proposals WHERE group_id = ?1 AND provider_version = ?2",
        )?;
        let refs = stmt
            .query_map(params![json(group_id)?, VERSION], |r| {
                r.get::<_, Vec<u8>>(0)
            })?
            .collect::<Result<Vec<_>, _>>()?;
        refs.iter().map(|r| decode(r)).collect()
    }

    fn queued_proposals<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<(ProposalRef, QueuedProposal)>, StorageError> {
        let key = json(group_id)?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT rowid, proposal_ref, proposal FROM openmls_proposals
             WHERE group_id = ?1 AND provider_version = ?2 ORDER BY rowid",
        )?;
        let rows = stmt
            .query_map(params![key, VERSION], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(rows.len());
        for (rowid, r, p) in rows {
            let proposal: QueuedProposal = decode(&p)?;
            if self.rewriting && !is_compact(&p) {
                self.put(
                    "UPDATE openmls_proposals SET proposal = ?1 WHERE rowid = ?2",
                    params![compact(&proposal)?, rowid],
                )?;
            }
            out.push((decode(&r)?, proposal));
        }
        Ok(out)
    }

    fn tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<TreeSync>, StorageError> {
        self.group_data(group_id, "tree", Encoding::Compact)
    }

    fn group_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupContext>, StorageError> {
        self.group_data(group_id, "context", Encoding::Compact)
    }

    fn interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<InterimTranscriptHash>, StorageError> {
        self.group_data(group_id, "interim_transcript_hash", Encoding::Compact)
    }

    fn confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ConfirmationTag>, StorageError> {
        self.group_data(group_id, "confirmation_tag", Encoding::Compact)
    }

    fn group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupState>, StorageError> {
        self.group_data(group_id, "group_state", Encoding::Compact)
    }

    fn message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MessageSecrets>, StorageError> {
        self.message_secrets_store(group_id)
    }

    fn resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ResumptionPskStore>, StorageError> {
        self.group_data(group_id, "resumption_psk_store", Encoding::Compact)
    }

    fn own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<LeafNodeIndex>, StorageError> {
        self.group_data(group_id, "own_leaf_index", Encoding::Compact)
    }

    fn group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupEpochSecrets>, StorageError> {
        self.group_data(group_id, "group_epoch_secrets", Encoding::Compact)
    }

    fn signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<Option<SignatureKeyPair>, StorageError> {
        self.value(
            "openmls_signature_keys",
            "signature_key",
            "public_key = ?1",
            params![json(public_key)?],
            Encoding::Compact,
        )
    }

    fn encryption_key_pair<
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<Option<HpkeKeyPair>, StorageError> {
        self.value(
            "openmls_encryption_keys",
            "key_pair",
            "public_key = ?1",
            params![json(public_key)?],
            Encoding::Compact,
        )
    }

    fn encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<Vec<HpkeKeyPair>, StorageError> {
        Ok(self
            .value(
                "openmls_epoch_keys_pairs",
                "key_pairs",
                "group_id = ?1 AND epoch_id = ?2 AND leaf_index = ?3",
                params![json(group_id)?, json(epoch)?, leaf_index],
                Encoding::Compact,
            )?
            .unwrap_or_default())
    }

    fn key_package<
        KeyPackageRef: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<Option<KeyPackage>, StorageError> {
        self.value(
            "openmls_key_packages",
            "key_package",
            "key_package_ref = ?1",
            params![json(hash_ref)?],
            Encoding::Compact,
        )
    }

    fn psk<PskBundle: traits::PskBundle<CURRENT_VERSION>, PskId: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskId,
    ) -> Result<Option<PskBundle>, StorageError> {
        self.value(
            "openmls_psks",
            "psk_bundle",
            "psk_id = ?1",
            params![json(psk_id)?],
            Encoding::Compact,
        )
    }

    fn remove_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
    ) -> Result<(), StorageError> {
        self.put(
            "DELETE FROM openmls_proposals WHERE group_id = ?1 AND proposal_ref = ?2 AND provider_version = ?3",
            params![json(group_id)?, json(proposal_ref)?, VERSION],
        )
    }

    fn delete_own_leaf_nodes<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.put(
            "DELETE FROM openmls_own_leaf_nodes WHERE group_id = ?1 AND provider_version = ?2",
            params![json(group_id)?, VERSION],
        )
    }

    fn delete_group_config<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.delete_group_data(group_id, "join_group_config")
    }

    fn delete_tree<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.delete_group_data(group_id, "tree")
    }

    fn delete_confirmation_tag<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.delete_group_data(group_id, "confirmation_tag")
    }

    fn delete_group_state<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.delete_group_data(group_id, "group_state")
    }

    fn delete_context<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.delete_group_data(group_id, "context")
    }

    fn delete_interim_transcript_hash<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.delete_group_data(group_id, "interim_transcript_hash")
    }

    fn delete_message_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.delete_message_secrets_store(group_id)
    }

    fn delete_all_resumption_psk_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.delete_group_data(group_id, "resumption_psk_store")
    }

    fn delete_own_leaf_index<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.delete_group_data(group_id, "own_leaf_index")
    }

    fn delete_group_epoch_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.delete_group_data(group_id, "group_epoch_secrets")
    }

    fn clear_proposal_queue<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<(), StorageError> {
        self.put(
            "DELETE FROM openmls_proposals WHERE group_id = ?1 AND provider_version = ?2",
            params![json(group_id)?, VERSION],
        )
    }

    fn delete_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<(), StorageError> {
        self.put(
            "DELETE FROM openmls_signature_keys WHERE public_key = ?1 AND provider_version = ?2",
            params![json(public_key)?, VERSION],
        )
    }

    fn delete_encryption_key_pair<EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>>(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<(), StorageError> {
        self.put(
            "DELETE FROM openmls_encryption_keys WHERE public_key = ?1 AND provider_version = ?2",
            params![json(public_key)?, VERSION],
        )
    }

    fn delete_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<(), StorageError> {
        self.put(
            "DELETE FROM openmls_epoch_keys_pairs
             WHERE group_id = ?1 AND epoch_id = ?2 AND leaf_index = ?3 AND provider_version = ?4",
            params![json(group_id)?, json(epoch)?, leaf_index, VERSION],
        )
    }

    fn delete_key_package<KeyPackageRef: traits::HashReference<CURRENT_VERSION>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<(), StorageError> {
        self.put(
            "DELETE FROM openmls_key_packages WHERE key_package_ref = ?1 AND provider_version = ?2",
            params![json(hash_ref)?, VERSION],
        )
    }

    fn delete_psk<PskKey: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskKey,
    ) -> Result<(), StorageError> {
        self.put(
            "DELETE FROM openmls_psks WHERE psk_id = ?1 AND provider_version = ?2",
            params![json(psk_id)?, VERSION],
        )
    }
}

#[cfg(test)]
mod tests {
    use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
    use openmls::prelude::*;
    use openmls_basic_credential::SignatureKeyPair;
    use openmls_rust_crypto::OpenMlsRustCrypto;

    use super::*;
    use crate::CIPHERSUITE;
    use crate::mls_config::MAX_PAST_EPOCHS;
    use crate::profile::Provider;

    /// A database with the profile's schema (no key: these tests are about
    /// the encoding, the profile tests run on SQLCipher files).
    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::profile::db::migrate(&mut conn).unwrap();
        conn
    }

    struct Member {
        signer: SignatureKeyPair,
        credential: CredentialWithKey,
    }

    fn member(provider: &impl OpenMlsProvider, name: &str) -> Member {
        let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).unwrap();
        signer.store(provider.storage()).unwrap();
        let credential = CredentialWithKey {
            credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
            signature_key: signer.public().into(),
        };
        Member { signer, credential }
    }

    fn key_package(provider: &impl OpenMlsProvider, m: &Member) -> KeyPackage {
        KeyPackage::builder()
            .build(CIPHERSUITE, provider, &m.signer, m.credential.clone())
            .unwrap()
            .key_package()
            .clone()
    }

    fn wire(out: &MlsMessageOut) -> MlsMessageIn {
        MlsMessageIn::tls_deserialize_exact(out.tls_serialize_detached().unwrap()).unwrap()
    }

    fn protocol(out: &MlsMessageOut) -> ProtocolMessage {
        wire(out).try_into_protocol_message().unwrap()
    }

    /// `to` processes `out`; merges it if it is a commit; the application
    /// message if it is one.
    fn process(
        provider: &impl OpenMlsProvider,
        to: &mut MlsGroup,
        out: &MlsMessageOut,
    ) -> Option<Vec<u8>> {
        let processed = to.process_message(provider, protocol(out)).unwrap();
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(m) => Some(m.into_bytes()),
            ProcessedMessageContent::StagedCommitMessage(c) => {
                to.merge_staged_commit(provider, *c).unwrap();
                None
            }
            ProcessedMessageContent::ProposalMessage(p) => {
                to.store_pending_proposal(provider.storage(), *p).unwrap();
                None
            }
            _ => None,
        }
    }

    /// alice's group with bob and `others` more members who never join;
    /// its past epochs filled with self-updates.
    fn group<'a>(
        a: &'a Connection,
        b: &'a Connection,
        others: usize,
    ) -> (
        Provider<'a>,
        Member,
        MlsGroup,
        Provider<'a>,
        Member,
        MlsGroup,
    ) {
        let (pa, pb) = (Provider::new(a), Provider::new(b));
        let (alice, bob) = (member(&pa, "alice"), member(&pb, "bob"));
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .build();
        let mut ga = MlsGroup::new(&pa, &alice.signer, &config, alice.credential.clone()).unwrap();
        let mut kps = vec![key_package(&pb, &bob)];
        for i in 0..others {
            let p = OpenMlsRustCrypto::default();
            let m = member(&p, &format!("m{i}"));
            kps.push(key_package(&p, &m));
        }
        let (_c, welcome, _gi) = ga.add_members(&pa, &alice.signer, &kps).unwrap();
        ga.merge_pending_commit(&pa).unwrap();
        let MlsMessageBodyIn::Welcome(w) = wire(&welcome).extract() else {
            panic!("not a Welcome")
        };
        let join = MlsGroupJoinConfig::builder()
            .use_ratchet_tree_extension(true)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .build();
        let mut gb = StagedWelcome::new_from_welcome(&pb, &join, w, None)
            .unwrap()
            .into_group(&pb)
            .unwrap();
        for _ in 0..MAX_PAST_EPOCHS {
            let bundle = ga
                .self_update(&pa, &alice.signer, LeafNodeParameters::default())
                .unwrap();
            ga.merge_pending_commit(&pa).unwrap();
            process(&pb, &mut gb, bundle.commit());
        }
        (pa, alice, ga, pb, bob, gb)
    }

    fn blobs(conn: &Connection, sql: &str) -> Vec<Vec<u8>> {
        conn.prepare(sql)
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn group_state_round_trips_compactly_and_keys_stay_json() {
        let (a, b) = (db(), db());
        let (pa, alice, mut ga, pb, bob, mut gb) = group(&a, &b, 1);
        let out = ga.create_message(&pa, &alice.signer, b"hi").unwrap();
        assert_eq!(process(&pb, &mut gb, &out).unwrap(), b"hi");
        // A proposal queued at both (bob's update, committed by alice).
        let (proposal, _) = gb
            .propose_self_update(&pb, &bob.signer, LeafNodeParameters::default())
            .unwrap();
        process(&pa, &mut ga, &proposal);
        assert_eq!(ga.pending_proposals().count(), 1);

        // What the databases hold.
        for (table, column) in [
            ("openmls_group_data", "group_id"),
            ("openmls_proposals", "group_id"),
            ("openmls_proposals", "proposal_ref"),
            ("openmls_signature_keys", "public_key"),
            ("openmls_encryption_keys", "public_key"),
            ("openmls_epoch_keys_pairs", "group_id"),
            ("openmls_epoch_keys_pairs", "epoch_id"),
            ("mls_message_secrets", "group_id"),
        ] {
            let keys: Vec<_> = [&a, &b]
                .into_iter()
                .flat_map(|db| blobs(db, &format!("SELECT {column} FROM {table}")))
                .collect();
            assert!(!keys.is_empty(), "{table}");
            for k in keys {
                serde_json::from_slice::<serde_json::Value>(&k).unwrap();
            }
        }
        // The group id key is the JSON of earlier releases, byte for byte.
        let gid = serde_json::to_vec(ga.group_id()).unwrap();
        assert_eq!(
            blobs(&a, "SELECT DISTINCT group_id FROM mls_message_secrets"),
            [gid]
        );
        for (table, column) in [
            ("openmls_proposals", "proposal"),
            ("openmls_signature_keys", "signature_key"),
            ("openmls_encryption_keys", "key_pair"),
            ("openmls_epoch_keys_pairs", "key_pairs"),
            ("mls_message_secrets", "bytes WHERE chunk = 0"),
            (
                "openmls_group_data",
                "group_data WHERE data_type != 'join_group_config'",
            ),
        ] {
            let sql = match column.split_once(" WHERE ") {
                Some((c, filter)) => format!("SELECT {c} FROM {table} WHERE {filter}"),
                None => format!("SELECT {column} FROM {table}"),
            };
            let values: Vec<_> = [&a, &b]
                .into_iter()
                .flat_map(|db| blobs(db, &sql))
                .collect();
            assert!(!values.is_empty(), "{table}");
            for v in values {
                assert!(is_compact(&v), "{table}.{column}");
            }
        }
        // Bob's key package went when he joined; a new one is compact.
        let kp = key_package(&pb, &bob);
        let hash = kp.hash_ref(pb.crypto()).unwrap();
        let bundle: KeyPackageBundle = pb.storage().key_package(&hash).unwrap().unwrap();
        assert_eq!(bundle.key_package(), &kp);
        assert!(
            blobs(&b, "SELECT key_package FROM openmls_key_packages")
                .iter()
                .all(|v| is_compact(v))
        );

        // Loaded again from the database, the groups go on: a commit of the
        // queued proposal, messages each way.
        let mut ga = MlsGroup::load(pa.storage(), ga.group_id())
            .unwrap()
            .unwrap();
        let mut gb = MlsGroup::load(pb.storage(), gb.group_id())
            .unwrap()
            .unwrap();
        assert_eq!(ga.pending_proposals().count(), 1);
        assert_eq!(
            ga.epoch_authenticator().as_slice(),
            gb.epoch_authenticator().as_slice()
        );
        let (commit, _, _) = ga.commit_to_pending_proposals(&pa, &alice.signer).unwrap();
        ga.merge_pending_commit(&pa).unwrap();
        process(&pb, &mut gb, &commit);
        assert_eq!(
            ga.epoch_authenticator().as_slice(),
            gb.epoch_authenticator().as_slice()
        );
        let out = gb.create_message(&pb, &bob.signer, b"back").unwrap();
        assert_eq!(process(&pa, &mut ga, &out).unwrap(), b"back");
        let out = ga.create_message(&pa, &alice.signer, b"again").unwrap();
        assert_eq!(process(&pb, &mut gb, &out).unwrap(), b"again");

        // A pending commit (the group state between a commit and its
        // confirmation) loads and merges.
        let bundle = gb
            .self_update(&pb, &bob.signer, LeafNodeParameters::default())
            .unwrap();
        let mut gb = MlsGroup::load(pb.storage(), gb.group_id())
            .unwrap()
            .unwrap();
        assert!(gb.pending_commit().is_some());
        gb.merge_pending_commit(&pb).unwrap();
        process(&pa, &mut ga, bundle.commit());
        assert_eq!(
            ga.epoch_authenticator().as_slice(),
            gb.epoch_authenticator().as_slice()
        );
    }

    #[test]
    fn a_message_rewrites_a_piece_of_the_message_secrets_store_not_all_of_it() {
        let (a, b) = (db(), db());
        let (pa, alice, mut ga, pb, _bob, mut gb) = group(&a, &b, 126);
        let pieces: i64 = a
            .query_row("SELECT count(*) FROM mls_message_secrets", [], |r| r.get(0))
            .unwrap();
        assert!(pieces >= 8, "{pieces} pieces");
        // The first message of a sender in an epoch changes its path in the
        // secret tree; the next ones only its ratchet.
        let out = ga.create_message(&pa, &alice.signer, b"first").unwrap();
        process(&pb, &mut gb, &out);
        for _ in 0..3 {
            let before = (a.total_changes(), b.total_changes());
            let out = ga.create_message(&pa, &alice.signer, b"next").unwrap();
            assert_eq!(process(&pb, &mut gb, &out).unwrap(), b"next");
            let sent = a.total_changes() - before.0;
            let received = b.total_changes() - before.1;
            assert!((1..=2).contains(&sent), "{sent} pieces written of {pieces}");
            assert!(
                (1..=2).contains(&received),
                "{received} pieces written of {pieces}"
            );
        }
    }

    #[test]
    fn pieces_follow_the_value_as_it_grows_shrinks_and_goes() {
        let conn = db();
        let s = MlsStorage::new(&conn);
        let gid = GroupId::from_slice(b"group");
        let count = || -> i64 {
            conn.query_row("SELECT count(*) FROM mls_message_secrets", [], |r| r.get(0))
                .unwrap()
        };
        let mut value: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        s.write_message_secrets_store(&gid, &value).unwrap();
        // postcard: the tag, the length (2 bytes), the bytes
        assert_eq!(count(), 10_003usize.div_ceil(CHUNK) as i64);
        let read: Option<Vec<u8>> = s.message_secrets_store(&gid).unwrap();
        assert_eq!(read.as_ref(), Some(&value));

        // The same value writes nothing; one byte changed writes one piece.
        let before = conn.total_changes();
        s.write_message_secrets_store(&gid, &value).unwrap();
        assert_eq!(conn.total_changes(), before);
        value[5_000] ^= 1;
        s.write_message_secrets_store(&gid, &value).unwrap();
        assert_eq!(conn.total_changes(), before + 1);
        let read: Option<Vec<u8>> = s.message_secrets_store(&gid).unwrap();
        assert_eq!(read.as_ref(), Some(&value));

        value.truncate(4_000);
        s.write_message_secrets_store(&gid, &value).unwrap();
        assert_eq!(count(), 2);
        let read: Option<Vec<u8>> = s.message_secrets_store(&gid).unwrap();
        assert_eq!(read.as_ref(), Some(&value));

        StorageProvider::<CURRENT_VERSION>::delete_message_secrets(&s, &gid).unwrap();
        assert_eq!(count(), 0);
        let read: Option<Vec<u8>> = s.message_secrets_store(&gid).unwrap();
        assert_eq!(read, None);
    }

    #[test]
    fn json_values_of_earlier_releases_are_read_and_json_never_starts_like_compact() {
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        struct V {
            a: Vec<u8>,
            b: Option<u64>,
        }
        let v = V {
            a: vec![1, 200, 3],
            b: Some(7),
        };
        let old = serde_json::to_vec(&v).unwrap();
        assert!(!is_compact(&old));
        assert_eq!(decode::<V>(&old).unwrap(), v);
        let new = compact(&v).unwrap();
        assert!(is_compact(&new) && new.len() < old.len());
        assert_eq!(decode::<V>(&new).unwrap(), v);
        // A tag byte is not JSON (no value is read the wrong way).
        assert!(serde_json::from_slice::<serde_json::Value>(&new).is_err());
    }
}
