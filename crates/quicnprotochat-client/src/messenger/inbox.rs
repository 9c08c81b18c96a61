//! Reading the server queue into the profile: fetching it in batches,
//! processing envelopes, acknowledging what is stored.
//!
//! The profile is locked only to process a batch, never across a fetch or
//! an acknowledgement.  A batch is processed in one transaction that also
//! moves the queue cursor (never backwards), and acknowledged only after
//! that transaction committed, so the server deletes nothing the profile
//! has not stored.  Two readers of the queue at once (a sync and the push
//! listener) may fetch the same envelopes; the second one finds them
//! processed already and shows nothing twice.
//!
//! Sequence numbers belong to the server store's incarnation; when it
//! changes (the server was restored from a backup, so its numbers may have
//! gone back) the cursor goes back to the start of the queue and everything
//! queued is read again; what was already processed is recognised by its
//! message id and not shown twice.

use quicnprotochat_core::{Delivered, Event, Profile};

use super::error::MessengerError;
use super::local::Local;
use super::supervisor::Supervisor;
use crate::types::Envelope;

/// Messages fetched per `fetch` call while syncing.
const SYNC_BATCH: u32 = 256;

/// Profile setting: the store incarnation the queue cursor belongs to.
const INCARNATION_SETTING: &str = "queue_incarnation";

/// Records the store `incarnation` the server reported with the cursor's
/// sequence numbers; when it differs from the one recorded before, moves
/// the cursor back to the start of the queue and returns `true`: read again
/// from there.  An empty incarnation (a server of wire version 1) changes
/// nothing.
pub(super) fn restart_if_restored(
    profile: &mut Profile,
    incarnation: &[u8],
) -> Result<bool, MessengerError> {
    if incarnation.is_empty() {
        return Ok(false);
    }
    let known = profile.setting(INCARNATION_SETTING)?;
    if known.as_deref() == Some(incarnation) {
        return Ok(false);
    }
    let restored = known.is_some();
    if restored {
        tracing::warn!(
            "the server's store was restored from a backup (its incarnation changed): reading the queue again from its start"
        );
        // The cursor first: a crash between the two writes repeats this.
        profile.set_next_seq(1)?;
    }
    profile.set_setting(INCARNATION_SETTING, incarnation)?;
    Ok(restored)
}

/// Fetches, processes and acknowledges everything queued past the profile's
/// cursor, in order.
pub(super) async fn drain(link: &Supervisor, local: &Local) -> Result<Vec<Event>, MessengerError> {
    let mut events = Vec::new();
    loop {
        let next = local.run(|p| p.next_seq()).await?;
        let fetched = link.client().await.fetch_batch(next, SYNC_BATCH).await?;
        let incarnation = fetched.incarnation.clone();
        if local
            .run(move |p| restart_if_restored(p, &incarnation))
            .await?
        {
            continue;
        }
        let batch = fetched.messages;
        let Some(last) = batch.last().map(|e| e.seq) else {
            break;
        };
        // One transaction for the batch, cursor included.
        events.extend(local.run(move |p| process_envelopes(p, &batch)).await?);
        link.client()
            .await
            .ack_in(&fetched.incarnation, last)
            .await?;
    }
    Ok(events)
}

/// The groups with proposals waiting for a commit from us.
pub(super) fn pending_groups(events: &[Event]) -> Vec<Vec<u8>> {
    let mut ids: Vec<Vec<u8>> = events
        .iter()
        .filter_map(|e| match e {
            Event::ProposalsPending { group_id, .. } => Some(group_id.clone()),
            _ => None,
        })
        .collect();
    ids.dedup();
    ids
}

/// Processes envelopes in one transaction that also moves the queue cursor
/// past them; a bad one is logged and skipped (the others apply).  The error
/// is a storage failure, after which none applied.
pub(super) fn process_envelopes(
    profile: &mut Profile,
    batch: &[Envelope],
) -> Result<Vec<Event>, MessengerError> {
    let delivered: Vec<Delivered<'_>> = batch
        .iter()
        .map(|env| Delivered {
            seq: env.seq,
            message_id: &env.message_id,
            payload: &env.payload,
        })
        .collect();
    let mut events = Vec::new();
    for (env, result) in batch.iter().zip(profile.process_batch(&delivered)?) {
        match result {
            Ok(more) => events.extend(more),
            Err(e) => {
                tracing::warn!(seq = env.seq, error = %e, "ignored an invalid message");
            }
        }
    }
    Ok(events)
}
