//! The messenger's background work, the other half of the facade: the push
//! listener, the direct-message receiver, and what follows processing
//! (handing events to the bus and reacting to them).
//!
//! Both loops lock the profile only to process (on the blocking pool) and
//! make their round trips (acknowledging, committing pending proposals,
//! announcing, checking the directory, refilling key packages) with the
//! profile free.  The listener subscribes again after every reconnect,
//! from the profile's cursor.

use quicnprotochat_core::Event;
use quicnprotochat_p2p::Inbound;
use tokio::sync::mpsc;

use super::error::MessengerError;
use super::{Messenger, commits, inbox, routing};
use crate::connection::Subscription;

impl Messenger {
    /// Listens to the server's push subscription, from where the profile
    /// stopped, and subscribes again after every reconnect; stops only when
    /// the profile cannot be read or reconnecting gives up.
    pub(super) async fn listen_loop(self) {
        loop {
            let from = match self.inner.local.run(|p| p.next_seq()).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the queue cursor; listener stops");
                    return;
                }
            };
            match self.inner.link.client().await.subscribe(from).await {
                Ok(sub) => self.take_pushed(sub).await,
                Err(e) => tracing::warn!(error = %e, "subscribe failed; reconnecting"),
            }
            // The subscription ended (the connection is gone) or never
            // started. Reconnect.
            if self.inner.link.reconnect(usize::MAX).await.is_err() {
                return;
            }
        }
    }

    /// Processes what the subscription pushes, one envelope at a time, until
    /// it ends.
    async fn take_pushed(&self, mut sub: Subscription) {
        while let Some(env) = sub.next().await {
            let seq = env.seq;
            let processed = self
                .inner
                .local
                .run(move |p| {
                    if env.seq < p.next_seq()? {
                        // Already processed (e.g. by a concurrent sync).
                        return Ok(None);
                    }
                    inbox::process_envelopes(p, std::slice::from_ref(&env)).map(Some)
                })
                .await;
            let mut events = match processed {
                Ok(Some(events)) => events,
                Ok(None) => continue,
                Err(e) => {
                    // Not acknowledged: the next sync fetches it again.
                    tracing::error!(error = %e, "cannot store a received message");
                    continue;
                }
            };
            let _ = self.inner.link.client().await.ack(seq).await;
            for group_id in inbox::pending_groups(&events) {
                match commits::commit_pending(&self.inner.link, &self.inner.local, &group_id).await
                {
                    Ok(more) => events.extend(more),
                    Err(e) => tracing::debug!(error = %e, "committing pending proposals"),
                }
            }
            if let Err(e) = self.after_events(&events).await {
                tracing::warn!(error = %e, "follow-up after events failed");
            }
            self.publish(&events).await;
        }
    }

    /// Processes direct messages from peers.
    pub(super) async fn inbound_loop(self, mut rx: mpsc::Receiver<Inbound>) {
        while let Some(m) = rx.recv().await {
            if !routing::admissible(&m) {
                tracing::warn!("refused a direct message that is not an application message");
                m.reject();
                continue;
            }
            let (id, payload) = (m.message_id, m.payload.clone());
            let result = self
                .inner
                .local
                .run(move |p| p.process(&id, &payload))
                .await;
            match result {
                Ok(events) => {
                    m.accept();
                    self.publish(&events).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "refused an invalid direct message");
                    m.reject();
                }
            }
        }
    }

    /// Follow-ups after processing: replenish key packages after a join.
    pub(super) async fn after_events(&self, events: &[Event]) -> Result<(), MessengerError> {
        if events.iter().any(|e| matches!(e, Event::Joined { .. })) {
            self.replenish_key_packages(false).await?;
        }
        Ok(())
    }

    /// Hands events to listeners and reacts to them: allow announced peers,
    /// announce ourselves where members joined, and check those groups'
    /// members against the directory.
    pub(super) async fn publish(&self, events: &[Event]) {
        self.inner.router.allow_announced(events).await;
        let mut announce_in = Vec::new();
        for e in events {
            if let Event::Joined { group, .. } | Event::MembersAdded { group, .. } = e {
                announce_in.push(group.clone());
            }
            self.inner.bus.emit(e.clone());
        }
        for g in announce_in {
            if let Err(e) = self.announce(&g).await {
                tracing::debug!(error = %e, "announcing our direct address failed");
            }
            match self.verify_members(&g).await {
                Ok(mismatches) => {
                    for m in mismatches {
                        tracing::warn!(group = %g, member = %m.username, "member's credential does not match the directory");
                        self.inner.bus.emit(Event::DirectoryMismatch {
                            group: g.clone(),
                            member: m.username,
                            key: m.key,
                        });
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "checking members against the directory failed")
                }
            }
        }
    }
}
