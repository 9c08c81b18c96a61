//! Verifying contacts: safety numbers for the people in our groups (or in
//! the server's directory), marking them verified, and spotting a verified
//! contact whose key changed.

use quicnprotochat_core::{Contact, Event, MemberInfo, Verification};

use super::error::MessengerError;
use super::{Messenger, directory};

impl Messenger {
    /// The contacts named `username`: one per identity key members of our
    /// groups with that name have (more than one: someone claims another's
    /// name); when we share no group, the key the server's directory binds
    /// to the name.
    pub async fn contacts_named(&self, username: &str) -> Result<Vec<Contact>, MessengerError> {
        let name = username.to_string();
        let local = self
            .inner
            .local
            .run(move |p| p.contacts_named(&name))
            .await?;
        if !local.is_empty() {
            return Ok(local);
        }
        let key = directory::resolve(&self.inner.link.client().await, username).await?;
        let name = username.to_string();
        let contact = self.inner.local.run(move |p| p.contact(&name, key)).await?;
        Ok(vec![contact])
    }

    /// The members of `group`, each with whether the user verified their key.
    pub async fn members_verified(
        &self,
        group: &str,
    ) -> Result<Vec<(MemberInfo, Verification)>, MessengerError> {
        let group = group.to_string();
        self.inner
            .local
            .run(move |p| {
                let mut out = Vec::new();
                for m in p.members(&group)? {
                    let state = p.verification(&m.username, &m.key)?;
                    out.push((m, state));
                }
                Ok::<_, MessengerError>(out)
            })
            .await
    }

    /// Records that the user compared safety numbers with `contact` and
    /// they matched.
    pub async fn mark_verified(&self, contact: &Contact) -> Result<(), MessengerError> {
        let (name, key) = (contact.username.clone(), contact.key);
        self.inner
            .local
            .run(move |p| p.mark_verified(&name, &key))
            .await
    }

    /// Events for the members of `group` whose name is a verified contact's
    /// but whose key is not the verified one.
    pub(super) async fn verified_key_changes(
        &self,
        group: &str,
    ) -> Result<Vec<Event>, MessengerError> {
        let name = group.to_string();
        let changes = self
            .inner
            .local
            .run(move |p| p.verified_key_changes(&name))
            .await?;
        Ok(changes
            .into_iter()
            .map(|(m, verified)| Event::VerifiedKeyChanged {
                group: group.to_string(),
                member: m.username,
                key: m.key,
                verified,
            })
            .collect())
    }
}
