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

use quicnprotochat_core::{Delivered, Event, Profile};

use super::error::MessengerError;
use super::local::Local;
use super::supervisor::Supervisor;
use crate::types::Envelope;

/// Messages fetched per `fetch` call while syncing.
const SYNC_BATCH: u32 = 256;

/// Fetches, processes and acknowledges everything queued past the profile's
/// cursor, in order.
pub(super) async fn drain(link: &Supervisor, local: &Local) -> Result<Vec<Event>, MessengerError> {
    let mut events = Vec::new();
    loop {
        let next = local.run(|p| p.next_seq()).await?;
        let batch = link.client().await.fetch(next, SYNC_BATCH).await?;
        let Some(last) = batch.last().map(|e| e.seq) else {
            break;
        };
        // One transaction for the batch, cursor included.
        events.extend(local.run(move |p| process_envelopes(p, &batch)).await?);
        link.client().await.ack(last).await?;
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
