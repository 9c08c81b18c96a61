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
                Ok(sub) => {
                    let incarnation = sub.incarnation().to_vec();
                    let restored = self
                        .inner
                        .local
                        .run(move |p| inbox::restart_if_restored(p, &incarnation))
                        .await;
                    match restored {
                        // Subscribe again, from the start of the queue.
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "cannot record the store incarnation; listener stops");
                            return;
                        }
                    }
                    self.take_pushed(sub).await
                }
                Err(e) => tracing::warn!(error = %e, "subscribe failed; reconnecting"),
            }
            // The subscription ended (the connection is gone) or never
            // started. Reconnect.
            self.inner.bus.emit(Event::Disconnected {
                reason: "the connection to the server was lost".into(),
            });
            if self.inner.link.reconnect(usize::MAX).await.is_err() {
                return;
            }
            self.inner.bus.emit(Event::Reconnected);
        }
    }

    /// Processes what the subscription pushes, one envelope at a time, until
    /// it ends.
    async fn take_pushed(&self, mut sub: Subscription) {
        while let Some(env) = sub.next().await {
            let (seq, incarnation) = (env.seq, env.incarnation.clone());
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
            // Acknowledged in the incarnation it was read in: after a
            // restore (a new connection) the number means something else.
            let _ = self
                .inner
                .link
                .client()
                .await
                .ack_in(&incarnation, seq)
                .await;
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

    /// Tells the members of `group` named in `only` (everyone else when
    /// `None`) our delivery token, inside the group.
    pub(super) async fn announce_token(&self, group: &str, only: Option<&[String]>) {
        let (group, only) = (group.to_string(), only.map(<[String]>::to_vec));
        let out = self
            .inner
            .local
            .run(move |p| p.announce_delivery_token(&group, only.as_deref()))
            .await;
        let sent = match out {
            Ok(Some(out)) => self
                .inner
                .link
                .send_outgoing(&out)
                .await
                .map_err(MessengerError::from),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, "announcing our delivery token failed");
        }
    }

    /// Takes the delivery token `member` announced (now in the profile)
    /// into the tokens presented when sending.
    async fn learn_token(&self, member: quicnprotochat_core::IdentityKey) {
        let token = self
            .inner
            .local
            .run(move |p| p.delivery_token_of(member))
            .await;
        match token {
            Ok(Some(t)) => self.inner.link.learn_token(member, t).await,
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "reading an announced delivery token"),
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
    /// learn announced delivery tokens, announce ourselves (our address and
    /// our delivery token) where members joined, and check those groups'
    /// members against the directory and the user's verified contacts.
    pub(super) async fn publish(&self, events: &[Event]) {
        self.inner.router.allow_announced(events).await;
        let mut announce_in = Vec::new();
        for e in events {
            match e {
                Event::Joined { group, .. } => {
                    announce_in.push(group.clone());
                    self.announce_token(group, None).await;
                }
                Event::MembersAdded { group, members, .. } => {
                    announce_in.push(group.clone());
                    self.announce_token(group, Some(members)).await;
                }
                Event::DeliveryTokenAnnounced { key, .. } => self.learn_token(*key).await,
                _ => {}
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
            match self.verified_key_changes(&g).await {
                Ok(changes) => {
                    for e in changes {
                        if let Event::VerifiedKeyChanged { member, .. } = &e {
                            tracing::warn!(group = %g, member = %member, "a verified contact's identity key changed");
                        }
                        self.inner.bus.emit(e);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "checking verified contacts failed"),
            }
        }
    }
}
