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
//! Invariant: the caller holds the profile (`&mut Profile`) for the whole
//! operation, so no incoming message is processed while a commit is
//! pending.  Catching up commits the proposals that processing left
//! pending; such a commit may lose a race in turn and catch up again.

use quicnprotochat_core::{CommitOutcome, Event, GroupError, Outgoing, Profile};

use super::error::MessengerError;
use super::inbox;
use super::supervisor::Supervisor;
use crate::error::{ClientError, ServerErrorCode};

/// Attempts of a commit that keeps losing the epoch race before giving up.
pub const MAX_COMMIT_ATTEMPTS: usize = 8;

/// Runs a commit-producing operation under the server's epoch ordering:
/// on `staleEpoch`, discards it, processes the queue (the winning commit),
/// and tries again.
pub(super) async fn commit_with<F>(
    link: &Supervisor,
    profile: &mut Profile,
    mut make: F,
) -> Result<Vec<Event>, MessengerError>
where
    F: FnMut(&mut Profile) -> Result<CommitOutcome, GroupError>,
{
    let mut events = Vec::new();
    for _ in 0..MAX_COMMIT_ATTEMPTS {
        // Recorded as pending in the profile: from here on a stop or a
        // lost answer leaves it for `resume_pending`.
        let outcome = make(profile)?;
        if let Some(commit) = &outcome.commit {
            match link.send_outgoing(commit).await {
                Ok(()) => {}
                Err(e) if stored_nothing(&e) => {
                    profile.abort_commit(&outcome.group_id)?;
                    if e.server_code() == Some(ServerErrorCode::StaleEpoch) {
                        events.extend(catch_up(link, profile).await?);
                        continue;
                    }
                    return Err(e.into());
                }
                // No answer: the server may have stored it.  It stays
                // pending; the next sync sends it again and learns which.
                Err(e) => return Err(e.into()),
            }
        }
        events.extend(confirm(link, profile, &outcome).await?);
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

/// Merges a commit the server stored; the Welcome waits in the outbox
/// until the server has it (a failure now is reported, and the next sync
/// sends it again).  Returns the events of held messages the new epoch
/// let apply.
async fn confirm(
    link: &Supervisor,
    profile: &mut Profile,
    outcome: &CommitOutcome,
) -> Result<Vec<Event>, MessengerError> {
    let events = profile.confirm_commit_and_queue(outcome)?;
    if let Some(welcome) = &outcome.welcome {
        send_from_outbox(link, profile, welcome).await?;
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
    profile: &mut Profile,
) -> Result<Vec<Event>, MessengerError> {
    let mut events = Vec::new();
    for outcome in profile.pending_commits()? {
        if let Some(commit) = &outcome.commit {
            match link.send_outgoing(commit).await {
                Ok(()) => {}
                Err(e) if stored_nothing(&e) => {
                    tracing::info!(error = %e, "a pending commit of ours was not stored; discarded");
                    profile.abort_commit(&outcome.group_id)?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        tracing::info!("a pending commit of ours is stored; merged");
        // The Welcome is in the outbox now; `catch_up` flushes it next.
        events.extend(profile.confirm_commit_and_queue(&outcome)?);
    }
    Ok(events)
}

/// Commits the proposals pending in `group_id` (processing left them for
/// us to commit).
pub(super) async fn commit_pending(
    link: &Supervisor,
    profile: &mut Profile,
    group_id: &[u8],
) -> Result<Vec<Event>, MessengerError> {
    commit_with(link, profile, |p| {
        p.commit_pending(group_id)?
            .ok_or(GroupError::NothingPending)
    })
    .await
}

/// Brings the profile up to date with the server: sends what is left in
/// the outbox, processes the whole queue, and commits the proposals that
/// processing left pending.  Returns the events, in order.
pub(super) async fn catch_up(
    link: &Supervisor,
    profile: &mut Profile,
) -> Result<Vec<Event>, MessengerError> {
    let mut events = resume_pending(link, profile).await?;
    flush_outbox(link, profile).await;
    events.extend(inbox::drain(link, profile).await?);
    let pending = inbox::pending_groups(&events);
    for group_id in pending {
        events.extend(
            Box::pin(commit_pending(link, profile, &group_id))
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
    profile: &mut Profile,
    out: &Outgoing,
) -> Result<(), MessengerError> {
    match link.send_outgoing(out).await {
        Ok(()) => Ok(profile.outbox_sent(&out.message_id)?),
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
            profile.outbox_sent(&out.message_id)?;
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Sends what is left in the outbox (Welcomes whose first send failed),
/// oldest first, stopping at the first failure; what is not sent stays
/// for the next sync.
async fn flush_outbox(link: &Supervisor, profile: &mut Profile) {
    let pending = match profile.outbox() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the outbox");
            return;
        }
    };
    for out in pending {
        if let Err(e) = send_from_outbox(link, profile, &out).await {
            tracing::warn!(error = %e, "outbox message not sent yet");
            return;
        }
    }
}
