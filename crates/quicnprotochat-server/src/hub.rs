//! Wakes push subscriptions when their queue grows, and hands them what was
//! just committed from memory.
//!
//! Every enqueue that the store committed calls [`Hub::notify`] for each
//! recipient with a live subscription (and, on a store shared by several
//! nodes, so does every commit another node announces, without the
//! message); the message goes into that
//! recipient's small buffer (ascending sequence numbers) and the watch value
//! wakes the subscription tasks.  A subscription delivers from the buffer
//! when the buffer holds its next sequence number and reads the store only
//! to catch up (a resume from an older position, a gap after an eviction or
//! a skipped insert, a message too large for the budget), and not at all
//! once it has pushed the newest sequence number announced ([`Announced`]).
//! Without the buffer every pushed message was read back from the store on
//! a reader connection, whose page cache SQLite drops after every commit by
//! the writer, so its pages were decrypted again; without the announced
//! number every push was followed by a read that found nothing.
//!
//! Memory is bounded three ways: per recipient (messages and bytes), for all
//! buffers together, and by having buffers only for recipients with a live
//! subscription (the entry goes when the last subscription does).
//! Acknowledged messages are dropped from the buffer, so it never serves
//! what the store has deleted.
//!
//! Single-threaded (lives on the RPC `LocalSet`), so `RefCell` suffices and
//! nothing can be poisoned.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use quicnprotochat_core::IdentityKey;
use tokio::sync::watch;

use crate::store::QueuedMessage;

/// Messages kept per recipient.
pub(crate) const BUFFER_MESSAGES: usize = 256;
/// Payload bytes kept per recipient.
pub(crate) const BUFFER_BYTES: usize = 256 * 1024;
/// Payload bytes kept for all recipients together.
pub(crate) const TOTAL_BYTES: usize = 64 * 1024 * 1024;

/// What a recipient's subscriptions are told: the newest sequence number
/// committed to its queue that this node has heard of, and how many times
/// every subscription was told to read its queue from the store (after
/// announcements may have been missed).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Announced {
    pub(crate) newest: u64,
    pub(crate) resyncs: u64,
}

/// A committed message, as pushed.
#[derive(Debug)]
pub(crate) struct Pushed {
    pub(crate) message_id: [u8; 16],
    pub(crate) payload: Rc<[u8]>,
    pub(crate) enqueued_at_ms: u64,
}

struct Entry {
    tx: watch::Sender<Announced>,
    /// (sequence number, message), ascending by sequence number
    recent: VecDeque<(u64, Rc<Pushed>)>,
    bytes: usize,
}

/// See the module documentation.
#[derive(Default)]
pub(crate) struct Hub {
    queues: RefCell<HashMap<IdentityKey, Entry>>,
    total_bytes: Cell<usize>,
}

impl Hub {
    /// A receiver woken with the newest committed sequence number of `key`
    /// (and when every subscription must read the store).
    pub(crate) fn watch(&self, key: IdentityKey) -> watch::Receiver<Announced> {
        self.queues
            .borrow_mut()
            .entry(key)
            .or_insert_with(|| Entry {
                tx: watch::channel(Announced::default()).0,
                recent: VecDeque::new(),
                bytes: 0,
            })
            .tx
            .subscribe()
    }

    /// Whether any of `keys` has a live subscription.
    pub(crate) fn any_subscribed(&self, keys: &[IdentityKey]) -> bool {
        let queues = self.queues.borrow();
        keys.iter()
            .any(|k| queues.get(k).is_some_and(|e| e.tx.receiver_count() > 0))
    }

    /// A message was committed for `key` as `seq`: wake its subscriptions,
    /// and buffer `message` when given.  Call it after every commit, with or
    /// without the message: a subscription that started after the caller
    /// looked ([`Hub::any_subscribed`]) must still be woken, or it would
    /// sleep until the next message (it then reads the store: the buffer
    /// lacks `seq`).
    pub(crate) fn notify(&self, key: &IdentityKey, seq: u64, message: Option<&Rc<Pushed>>) {
        let mut queues = self.queues.borrow_mut();
        let Some(entry) = queues.get_mut(key) else {
            return;
        };
        if entry.tx.receiver_count() == 0 {
            self.drop_entry(&mut queues, key);
            return;
        }
        if let Some(message) = message {
            self.buffer(entry, seq, message);
        }
        // Wake only for news: a queue's commits happen in sequence order, so
        // when `seq` is not above the newest one announced, a wake for a
        // later commit already went out and its reader sees `seq` too.
        // (Another node's notification of a message this node enqueued
        // itself then costs no read.)
        entry.tx.send_if_modified(|announced| {
            let news = seq > announced.newest;
            if news {
                announced.newest = seq;
            }
            news
        });
    }

    /// Wakes every subscription to read its queue from the store: after
    /// notifications may have been missed (the connection that brings other
    /// nodes' notifications was lost and is back).
    pub(crate) fn wake_all(&self) {
        for entry in self.queues.borrow().values() {
            entry
                .tx
                .send_modify(|a| a.resyncs = a.resyncs.wrapping_add(1));
        }
    }

    fn buffer(&self, entry: &mut Entry, seq: u64, message: &Rc<Pushed>) {
        let size = message.payload.len();
        if size <= BUFFER_BYTES && self.total_bytes.get().saturating_add(size) <= TOTAL_BYTES {
            // Completions of concurrent enqueues can arrive out of order.
            let at = entry.recent.partition_point(|(s, _)| *s < seq);
            if entry.recent.get(at).is_none_or(|(s, _)| *s != seq) {
                entry.recent.insert(at, (seq, Rc::clone(message)));
                entry.bytes += size;
                self.total_bytes.set(self.total_bytes.get() + size);
            }
            while entry.recent.len() > BUFFER_MESSAGES || entry.bytes > BUFFER_BYTES {
                self.pop_front(entry);
            }
        }
    }

    /// The buffered messages of `key` from `next` on, contiguous, at most
    /// `max_messages` and about `max_bytes` (always at least one); `None`
    /// when the buffer does not hold `next` (read the store instead).
    pub(crate) fn buffered(
        &self,
        key: &IdentityKey,
        next: u64,
        max_messages: usize,
        max_bytes: usize,
    ) -> Option<Vec<QueuedMessage>> {
        let queues = self.queues.borrow();
        let entry = queues.get(key)?;
        let start = entry.recent.partition_point(|(s, _)| *s < next);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut expected = next;
        for (seq, m) in entry.recent.range(start..) {
            if *seq != expected
                || out.len() >= max_messages
                || (bytes >= max_bytes && !out.is_empty())
            {
                break;
            }
            bytes += m.payload.len();
            out.push(QueuedMessage {
                seq: *seq,
                message_id: m.message_id.to_vec(),
                payload: m.payload.to_vec(),
                enqueued_at_ms: m.enqueued_at_ms,
            });
            expected = seq.saturating_add(1);
        }
        (!out.is_empty()).then_some(out)
    }

    /// `key` acknowledged everything up to `up_to`: the store deleted it, so
    /// the buffer must not serve it either.
    pub(crate) fn acked(&self, key: &IdentityKey, up_to: u64) {
        let mut queues = self.queues.borrow_mut();
        if let Some(entry) = queues.get_mut(key) {
            while entry.recent.front().is_some_and(|(s, _)| *s <= up_to) {
                self.pop_front(entry);
            }
        }
    }

    /// A subscription of `key` ended: drop the entry if it was the last.
    pub(crate) fn release(&self, key: &IdentityKey) {
        let mut queues = self.queues.borrow_mut();
        if queues.get(key).is_some_and(|e| e.tx.receiver_count() == 0) {
            self.drop_entry(&mut queues, key);
        }
    }

    fn pop_front(&self, entry: &mut Entry) {
        if let Some((_, m)) = entry.recent.pop_front() {
            entry.bytes -= m.payload.len();
            self.total_bytes
                .set(self.total_bytes.get().saturating_sub(m.payload.len()));
        }
    }

    fn drop_entry(&self, queues: &mut HashMap<IdentityKey, Entry>, key: &IdentityKey) {
        if let Some(entry) = queues.remove(key) {
            self.total_bytes
                .set(self.total_bytes.get().saturating_sub(entry.bytes));
        }
    }

    /// Payload bytes buffered for all recipients (for tests).
    #[cfg(test)]
    fn total_bytes(&self) -> usize {
        self.total_bytes.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> IdentityKey {
        IdentityKey::from_slice(&[n; 32]).unwrap()
    }

    fn msg(size: usize) -> Rc<Pushed> {
        Rc::new(Pushed {
            message_id: [1; 16],
            payload: vec![0xA5; size].into(),
            enqueued_at_ms: 7,
        })
    }

    fn seqs(v: Option<Vec<QueuedMessage>>) -> Vec<u64> {
        v.unwrap_or_default().iter().map(|m| m.seq).collect()
    }

    #[test]
    fn every_commit_wakes_subscriptions_even_without_a_message_to_buffer() {
        // The enqueue looked for subscriptions before its commit and found
        // none; one started in between: it must still be woken.
        let hub = Hub::default();
        let mut rx = hub.watch(key(1));
        hub.notify(&key(1), 5, None);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().newest, 5);
        assert!(
            hub.buffered(&key(1), 5, 10, 1 << 20).is_none(),
            "read the store"
        );
    }

    #[test]
    fn only_news_wakes_and_a_lost_channel_wakes_everyone() {
        let hub = Hub::default();
        let mut rx = hub.watch(key(1));
        hub.notify(&key(1), 5, Some(&msg(10)));
        assert_eq!(
            *rx.borrow_and_update(),
            Announced {
                newest: 5,
                resyncs: 0
            }
        );
        // The same commit announced again (by the store's notification
        // channel), or an older one: nothing to read.
        hub.notify(&key(1), 5, None);
        hub.notify(&key(1), 4, None);
        assert!(!rx.has_changed().unwrap());
        hub.wake_all();
        assert!(rx.has_changed().unwrap());
        assert_eq!(
            *rx.borrow_and_update(),
            Announced {
                newest: 5,
                resyncs: 1
            }
        );
    }

    #[test]
    fn only_subscribed_recipients_are_buffered() {
        let hub = Hub::default();
        hub.notify(&key(1), 1, Some(&msg(10)));
        assert!(hub.buffered(&key(1), 1, 10, 1 << 20).is_none());
        assert_eq!(hub.total_bytes(), 0);
    }

    #[test]
    fn serves_a_contiguous_run_from_next_whatever_the_arrival_order() {
        let hub = Hub::default();
        let _rx = hub.watch(key(1));
        for seq in [3, 1, 2, 5] {
            hub.notify(&key(1), seq, Some(&msg(10)));
        }
        assert_eq!(seqs(hub.buffered(&key(1), 1, 10, 1 << 20)), [1, 2, 3]);
        assert_eq!(seqs(hub.buffered(&key(1), 2, 1, 1 << 20)), [2]);
        // 4 is missing: from 4 the store must be read
        assert!(hub.buffered(&key(1), 4, 10, 1 << 20).is_none());
        assert_eq!(seqs(hub.buffered(&key(1), 5, 10, 1 << 20)), [5]);
        // a duplicate notification is buffered once
        hub.notify(&key(1), 5, Some(&msg(10)));
        assert_eq!(hub.total_bytes(), 40);
    }

    #[test]
    fn acknowledged_messages_are_never_served_again() {
        let hub = Hub::default();
        let _rx = hub.watch(key(1));
        for seq in 1..=4 {
            hub.notify(&key(1), seq, Some(&msg(10)));
        }
        hub.acked(&key(1), 2);
        assert!(hub.buffered(&key(1), 1, 10, 1 << 20).is_none());
        assert_eq!(seqs(hub.buffered(&key(1), 3, 10, 1 << 20)), [3, 4]);
        assert_eq!(hub.total_bytes(), 20);
    }

    #[test]
    fn buffers_are_bounded_per_recipient_and_in_total() {
        let hub = Hub::default();
        let _rx = hub.watch(key(1));
        for seq in 1..=(BUFFER_MESSAGES as u64 + 10) {
            hub.notify(&key(1), seq, Some(&msg(10)));
        }
        assert!(
            hub.buffered(&key(1), 10, 1, 1 << 20).is_none(),
            "oldest evicted"
        );
        assert_eq!(hub.total_bytes(), BUFFER_MESSAGES * 10);
        // a message larger than a recipient's budget is not buffered, and
        // byte eviction keeps the buffer under it
        let big = BUFFER_BYTES / 2 + 1;
        let next = BUFFER_MESSAGES as u64 + 11;
        hub.notify(&key(1), next, Some(&msg(BUFFER_BYTES + 1)));
        assert!(hub.buffered(&key(1), next, 1, 1 << 20).is_none());
        hub.notify(&key(1), next + 1, Some(&msg(big)));
        hub.notify(&key(1), next + 2, Some(&msg(big)));
        assert!(hub.total_bytes() <= BUFFER_BYTES);
        assert_eq!(
            seqs(hub.buffered(&key(1), next + 2, 10, 1 << 20)),
            [next + 2]
        );
        // the last subscription going drops the buffer and its bytes
        drop(_rx);
        hub.release(&key(1));
        assert_eq!(hub.total_bytes(), 0);
    }

    #[test]
    fn a_batch_stops_at_the_byte_limit_but_always_carries_one() {
        let hub = Hub::default();
        let _rx = hub.watch(key(1));
        for seq in 1..=3 {
            hub.notify(&key(1), seq, Some(&msg(100)));
        }
        assert_eq!(seqs(hub.buffered(&key(1), 1, 10, 150)), [1, 2]);
        assert_eq!(seqs(hub.buffered(&key(1), 1, 10, 10)), [1]);
    }
}
