//! The event bus: every event the profile produced, whether it came through
//! the server or directly from a peer, goes to every [`EventStream`].
//!
//! Emitting never waits for a listener: one that falls more than
//! [`EVENT_BUS`] events behind misses some (it is told, and the history has
//! the messages).

use quicnprotochat_core::Event;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

/// Events buffered per listener before the slowest one starts to miss
/// some (history is stored regardless).
const EVENT_BUS: usize = 4096;

/// The sending side, shared by everything that processes messages.
#[derive(Debug)]
pub(super) struct EventBus {
    tx: broadcast::Sender<Event>,
}

impl EventBus {
    pub(super) fn new() -> Self {
        Self {
            tx: broadcast::channel(EVENT_BUS).0,
        }
    }

    /// A receiver of every event emitted from now on.
    pub(super) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// Hands `event` to every listener (dropped when there is none).
    pub(super) fn emit(&self, event: Event) {
        let _ = self.tx.send(event);
    }
}

/// The stream of events from [`Messenger::listen`](super::Messenger::listen):
/// everything processed, whether it arrived through the server or directly
/// from a peer.
#[derive(Debug)]
pub struct EventStream {
    rx: broadcast::Receiver<Event>,
    task: JoinHandle<()>,
}

impl EventStream {
    /// A stream reading `rx`; dropping it stops `task` (the listener that
    /// feeds the bus).
    pub(super) fn new(rx: broadcast::Receiver<Event>, task: JoinHandle<()>) -> Self {
        Self { rx, task }
    }

    /// The next event; `None` if the messenger stopped.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            match self.rx.recv().await {
                Ok(e) => return Some(e),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "event listener fell behind; see history for missed messages"
                    );
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
