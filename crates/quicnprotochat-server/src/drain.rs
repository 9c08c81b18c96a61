//! Graceful shutdown: the server-wide drain signal and each connection's
//! count of calls in flight.
//!
//! [`Drain::start`] is called once, when the server is told to stop; every
//! connection holds a [`DrainSignal`] and learns the deadline from it.  Each
//! connection counts its calls in flight in [`Calls`]: a call that starts
//! after the drain began is refused (the client retries it on another
//! connection), the calls already running finish, and the connection closes
//! once none is left or the deadline passed, whichever comes first.
//!
//! Single-threaded (lives on the RPC `LocalSet`): `Rc` and tokio's `watch`
//! channels, nothing that can be poisoned.

use std::rc::Rc;

use tokio::sync::watch;
use tokio::time::Instant;

/// The server's side of the drain signal.
#[derive(Debug)]
pub(crate) struct Drain {
    tx: watch::Sender<Option<Instant>>,
}

impl Drain {
    /// A server that is not draining.
    pub(crate) fn new() -> Self {
        Self {
            tx: watch::Sender::new(None),
        }
    }

    /// A handle for one connection.
    pub(crate) fn signal(&self) -> DrainSignal {
        DrainSignal {
            rx: self.tx.subscribe(),
        }
    }

    /// Starts draining: in-flight calls may run until `deadline`.
    pub(crate) fn start(&self, deadline: Instant) {
        self.tx.send_replace(Some(deadline));
    }
}

/// A connection's view of the drain signal.
#[derive(Debug, Clone)]
pub(crate) struct DrainSignal {
    rx: watch::Receiver<Option<Instant>>,
}

impl DrainSignal {
    /// Whether the server is draining.
    pub(crate) fn started(&self) -> bool {
        self.rx.borrow().is_some()
    }

    /// Resolves with the deadline once the server starts draining (at once
    /// if it already has).  Never resolves while the server serves.
    pub(crate) async fn wait(&mut self) -> Instant {
        match self.rx.wait_for(Option::is_some).await {
            Ok(deadline) => deadline.unwrap_or_else(Instant::now),
            // The server is gone without draining: nothing is left to wait for.
            Err(_) => Instant::now(),
        }
    }
}

/// The calls in flight on one connection.
#[derive(Debug)]
pub(crate) struct Calls {
    in_flight: watch::Sender<usize>,
    drain: DrainSignal,
}

impl Calls {
    /// No call in flight yet.
    pub(crate) fn new(drain: DrainSignal) -> Rc<Self> {
        Rc::new(Self {
            in_flight: watch::Sender::new(0),
            drain,
        })
    }

    /// Counts a call that starts now, until the guard is dropped; `None` once
    /// the server drains (the call is refused).
    pub(crate) fn begin(self: &Rc<Self>) -> Option<CallGuard> {
        if self.drain.started() {
            return None;
        }
        self.in_flight.send_modify(|n| *n += 1);
        Some(CallGuard {
            calls: Rc::clone(self),
        })
    }

    /// The drain signal (push tasks stop when it fires).
    pub(crate) fn drain(&self) -> DrainSignal {
        self.drain.clone()
    }

    /// Resolves once no call is in flight.
    pub(crate) async fn idle(&self) {
        let mut rx = self.in_flight.subscribe();
        // The sender lives in `self`, so the channel cannot close here.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Calls in flight now.
    pub(crate) fn in_flight(&self) -> usize {
        *self.in_flight.borrow()
    }
}

/// One call in flight; dropping it (the call answered) counts it out.
#[derive(Debug)]
pub(crate) struct CallGuard {
    calls: Rc<Calls>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.calls
            .in_flight
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_started_before_the_drain_finish_and_later_ones_are_refused() {
        let drain = Drain::new();
        let calls = Calls::new(drain.signal());
        let first = calls.begin().unwrap();
        let second = calls.begin().unwrap();
        assert_eq!(calls.in_flight(), 2);
        let mut signal = drain.signal();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        drain.start(deadline);
        assert_eq!(signal.wait().await, deadline);
        assert!(calls.begin().is_none(), "a call after the drain began");
        drop(first);
        let idle = calls.idle();
        tokio::pin!(idle);
        assert!(
            futures::poll!(idle.as_mut()).is_pending(),
            "one call still runs"
        );
        drop(second);
        idle.await;
        assert_eq!(calls.in_flight(), 0);
    }
}
