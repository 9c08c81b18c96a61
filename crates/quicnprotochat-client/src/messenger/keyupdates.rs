//! Automatic key updates: after the policy's number of messages sent, or
//! its age, this member commits an MLS self-update in the group by itself
//! (post-compromise security without anyone typing `update`).  Checked
//! after every send and, while listening, every few minutes.  Members come
//! due at different times (the age has a per-member, per-group spread), and
//! the server's one-commit-per-epoch rule settles the rare race.

use std::time::Duration;

use quicnprotochat_core::{Event, GroupError, KeyUpdatePolicy};

use super::Messenger;
use super::error::MessengerError;

/// How often a listening client checks whether its keys are due.
const CHECK_EVERY: Duration = Duration::from_secs(300);

impl Messenger {
    /// The automatic key-update policy (stored in the profile).
    pub async fn key_update_policy(&self) -> Result<KeyUpdatePolicy, MessengerError> {
        self.inner.local.run(|p| p.key_update_policy()).await
    }

    /// Sets the automatic key-update policy (stored in the profile).
    pub async fn set_key_update_policy(&self, p: KeyUpdatePolicy) -> Result<(), MessengerError> {
        self.inner
            .local
            .run(move |profile| profile.set_key_update_policy(p))
            .await
    }

    /// Commits a self-update in every group where our keys are due;
    /// returns what the commits produced.  A group that fails is logged and
    /// tried again at the next check.
    pub async fn update_due_keys(&self) -> Result<Vec<Event>, MessengerError> {
        let due = self
            .inner
            .local
            .run(|p| {
                let policy = p.key_update_policy()?;
                p.key_updates_due(policy)
            })
            .await?;
        let mut events = Vec::new();
        for group in due {
            match self.update(&group).await {
                Ok(more) => {
                    tracing::info!(group = %group, "refreshed our keys (automatic key update)");
                    events.extend(more);
                }
                // Removed from the group: nothing to refresh; not due again
                // before the policy's time.
                Err(MessengerError::Group(GroupError::Inactive)) => {
                    self.inner
                        .local
                        .run(move |p| p.record_key_update(&group))
                        .await?;
                }
                Err(e) => {
                    tracing::warn!(group = %group, error = %e, "automatic key update failed; trying again later");
                }
            }
        }
        Ok(events)
    }

    /// [`Messenger::update_due_keys`], with failures logged.
    pub(super) async fn update_due_keys_quietly(&self) {
        if let Err(e) = self.update_due_keys().await {
            tracing::warn!(error = %e, "checking for due key updates failed");
        }
    }

    /// Checks for due key updates now and every [`CHECK_EVERY`], forever
    /// (the listener's companion).
    pub(super) async fn key_update_loop(self) {
        loop {
            self.update_due_keys_quietly().await;
            tokio::time::sleep(CHECK_EVERY).await;
        }
    }
}
