//! Commit orchestration under the server's one-commit-per-epoch ordering.
//!
//! [`commit_with`] sends a commit; when it loses the race (`staleEpoch`)
//! it discards it, catches up (processes the winning commit and whatever
//! else is queued) and builds it again, at most [`MAX_COMMIT_ATTEMPTS`]
//! times.  Once the server has the commit it is merged, and the Welcome is
//! queued in the profile's outbox in the same transaction; the outbox is
//! flushed before every catch-up, so a Welcome whose send failed still
//! reaches the invitee.
//!
//! A commit is recorded as pending in the profile when it is made, and
//! stays so until it is merged or discarded.  When the server's answer
//! does not come (the connection dropped, the deadline passed, the client
//! stopped), it stays pending and [`resume_pending`] sends it again at the
//! next catch-up: the same message id, so the server's answer (stored, a
//! duplicate of what it stored, or a refusal) tells whether it has it.
//!
//! The profile is locked for each local step only, never while a commit is
//! on its way to the server, so incoming messages are processed while it
//! is: one from the epoch our commit starts is held until the commit is
//! merged (see the profile's `held.rs`), and one of another member's
//! commit that won the epoch discards ours (the server then refuses ours
//! with `staleEpoch`).  Confirming or discarding names the commit, so an
//! answer that comes after the commit was settled otherwise changes
//! nothing.  Catching up commits the proposals that processing left
//! pending; such a commit may lose a race in turn and catch up again.

use std::sync::Arc;

use quicnprotochat_core::{CommitOutcome, Event, GroupError, Outgoing, Profile};

use super::error::MessengerError;
use super::inbox;
use super::local::Local;
use super::supervisor::Supervisor;
use crate::error::{ClientError, ServerErrorCode};

/// Attempts of a commit that keeps losing the epoch race before giving up.
pub const MAX_COMMIT_ATTEMPTS: usize = 8;

/// Runs a commit-producing operation under the server's epoch ordering:
/// on `staleEpoch`, discards it, processes the queue (the winning commit),
/// and tries again.
pub(super) async fn commit_with<F>(
    link: &Supervisor,
    local: &Local,
    make: F,
) -> Result<Vec<Event>, MessengerError>
where
    F: Fn(&mut Profile) -> Result<CommitOutcome, GroupError> + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let mut events = Vec::new();
    for _ in 0..MAX_COMMIT_ATTEMPTS {
        // Recorded as pending in the profile: from here on a stop or a
        // lost answer leaves it for `resume_pending`.
        let m = make.clone();
        let outcome = local.run(move |p| m(p)).await?;
        if let Some(commit) = &outcome.commit {
            match link.send_outgoing(commit).await {
                Ok(()) => {}
                Err(e) if stored_nothing(&e) => {
                    discard(local, &outcome).await?;
                    if e.server_code() == Some(ServerErrorCode::StaleEpoch) {
                        events.extend(Box::pin(catch_up(link, local)).await?);
                        continue;
                    }
                    return Err(e.into());
                }
                // No answer: the server may have stored it.  It stays
                // pending; the next sync sends it again and learns which.
                Err(e) => return Err(e.into()),
            }
        }
        events.extend(confirm(link, local, &outcome).await?);
        return Ok(events);
    }
    Err(MessengerError::CommitConflict)
}

/// Whether the server's answer to a commit says it stored nothing (any
/// refusal but `internal`, which a store failing half-way may give); a
/// lost connection or a missed deadline says nothing.
fn stored_nothing(e: &ClientError) -> bool {
    e.server_code()
        .is_some_and(|c| c != ServerErrorCode::Internal)
}

/// Discards our pending commit `outcome` (if it is still the pending one).
async fn discard(local: &Local, outcome: &CommitOutcome) -> Result<(), MessengerError> {
    let outcome = outcome.clone();
    local.run(move |p| p.discard_commit(&outcome)).await
}

/// Merges a commit the server stored (if it is still the pending one); the
/// Welcome waits in the outbox until the server has it (a failure now is
/// reported, and the next sync sends it again).  Returns the events of
/// held messages the new epoch let apply.
async fn confirm(
    link: &Supervisor,
    local: &Local,
    outcome: &CommitOutcome,
) -> Result<Vec<Event>, MessengerError> {
    let settled = outcome.clone();
    let events = local
        .run(move |p| p.confirm_commit_and_queue(&settled))
        .await?;
    if let Some(welcome) = &outcome.welcome {
        send_from_outbox(link, local, welcome).await?;
    }
    Ok(events)
}

/// Settles the commits of ours that an earlier run left pending (it
/// stopped, or lost the answer, between sending and merging): each is
/// sent again under its message id, so the server stores it at most once,
/// and merged when the server has it or discarded when the server says it
/// stored nothing (another commit won the epoch).  Stops at the first
/// failure to reach the server; what is left stays pending.
pub(super) async fn resume_pending(
    link: &Supervisor,
    local: &Local,
) -> Result<Vec<Event>, MessengerError> {
    let mut events = Vec::new();
    for outcome in local.run(|p| p.pending_commits()).await? {
        if let Some(commit) = &outcome.commit {
            match link.send_outgoing(commit).await {
                Ok(()) => {}
                Err(e) if stored_nothing(&e) => {
                    tracing::info!(error = %e, "a pending commit of ours was not stored; discarded");
                    discard(local, &outcome).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        tracing::info!("a pending commit of ours is stored; merged");
        // The Welcome is in the outbox now; `catch_up` flushes it next.
        let settled = outcome.clone();
        events.extend(
            local
                .run(move |p| p.confirm_commit_and_queue(&settled))
                .await?,
        );
    }
    Ok(events)
}

/// Commits the proposals pending in `group_id` (processing left them for
/// us to commit).
pub(super) async fn commit_pending(
    link: &Supervisor,
    local: &Local,
    group_id: &[u8],
) -> Result<Vec<Event>, MessengerError> {
    let group_id = group_id.to_vec();
    commit_with(link, local, move |p| {
        p.commit_pending(&group_id)?
            .ok_or(GroupError::NothingPending)
    })
    .await
}

/// Brings the profile up to date with the server: settles our pending
/// commits, sends what is left in the outbox, processes the whole queue,
/// and commits the proposals that processing left pending.  Returns the
/// events, in order.
pub(super) async fn catch_up(
    link: &Supervisor,
    local: &Local,
) -> Result<Vec<Event>, MessengerError> {
    let mut events = resume_pending(link, local).await?;
    flush_outbox(link, local).await;
    events.extend(inbox::drain(link, local).await?);
    let pending = inbox::pending_groups(&events);
    for group_id in pending {
        events.extend(
            Box::pin(commit_pending(link, local, &group_id))
                .await
                .or_else(|e| match e {
                    MessengerError::Group(GroupError::NothingPending) => Ok(Vec::new()),
                    e => Err(e),
                })?,
        );
    }
    Ok(events)
}

/// Sends one outbox message and removes it once the server stored it,
/// or refused it for good (an argument or size it will never accept).
async fn send_from_outbox(
    link: &Supervisor,
    local: &Local,
    out: &Outgoing,
) -> Result<(), MessengerError> {
    let id = out.message_id;
    match link.send_outgoing(out).await {
        Ok(()) => local.run(move |p| p.outbox_sent(&id)).await,
        Err(e)
            if matches!(
                e.server_code(),
                Some(
                    ServerErrorCode::InvalidArgument
                        | ServerErrorCode::TooLarge
                        | ServerErrorCode::NotFound
                        | ServerErrorCode::Forbidden
                )
            ) =>
        {
            tracing::warn!(error = %e, "the server refused an outbox message for good; dropped");
            local.run(move |p| p.outbox_sent(&id)).await?;
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Sends what is left in the outbox (Welcomes whose first send failed),
/// oldest first, stopping at the first failure; what is not sent stays
/// for the next sync.
async fn flush_outbox(link: &Supervisor, local: &Local) {
    let pending = match local.run(|p| p.outbox()).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the outbox");
            return;
        }
    };
    for out in pending {
        if let Err(e) = send_from_outbox(link, local, &out).await {
            tracing::warn!(error = %e, "outbox message not sent yet");
            return;
        }
    }
}
