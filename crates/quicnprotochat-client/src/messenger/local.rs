//! The profile behind its lock.  Every operation on it runs on tokio's
//! blocking pool, so SQLCipher and MLS work never occupies a runtime
//! thread, and the lock is held for that one operation: never across a
//! network round trip.  Parts alternate local steps ([`Local::run`]) with
//! calls to the server made while the profile is free.

use std::sync::Arc;

use quicnprotochat_core::Profile;
use tokio::sync::Mutex;

use super::error::MessengerError;

/// The profile, shared by the messenger's parts and its background tasks.
#[derive(Clone)]
pub(super) struct Local {
    profile: Arc<Mutex<Profile>>,
}

impl Local {
    pub(super) fn new(profile: Profile) -> Self {
        Self {
            profile: Arc::new(Mutex::new(profile)),
        }
    }

    /// Runs `f` on the profile on the blocking pool, holding the lock for
    /// `f` alone.  A caller that stops waiting does not stop `f`: the
    /// operation completes (or fails) as a whole.
    pub(super) async fn run<T, E, F>(&self, f: F) -> Result<T, MessengerError>
    where
        T: Send + 'static,
        E: Into<MessengerError> + Send + 'static,
        F: FnOnce(&mut Profile) -> Result<T, E> + Send + 'static,
    {
        let mut guard = self.profile.clone().lock_owned().await;
        tokio::task::spawn_blocking(move || f(&mut guard).map_err(Into::into))
            .await
            .map_err(|_| MessengerError::NotConfigured("profile task failed"))?
    }
}
