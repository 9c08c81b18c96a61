//! The one clock.
//!
//! Every part that needs the time takes a [`Clock`] (as quinn-proto takes
//! `now`) instead of reading the system clock itself, so tests advance a
//! [`ManualClock`] instead of sleeping.  [`SystemClock`] is the only reader
//! of the operating system's clocks in the workspace's library code; the
//! server's tidy test fails on any other `SystemTime::now` or
//! `Instant::now` outside tests.
//!
//! A clock answers two questions: the wall time ([`Clock::now`]: Unix
//! timestamps, expiry of key packages and idempotency keys, message
//! times), and how much time has passed ([`Clock::elapsed`]: monotonic,
//! for token buckets, unaffected when the wall clock is set back).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The wall time.
    fn now(&self) -> SystemTime;

    /// Monotonic time since this clock was made.
    fn elapsed(&self) -> Duration;

    /// Seconds since the Unix epoch (0 before it).
    fn unix_secs(&self) -> u64 {
        unix_secs(self.now())
    }

    /// Milliseconds since the Unix epoch (0 before it, saturating far after).
    fn unix_ms(&self) -> u64 {
        unix_ms(self.now())
    }
}

/// A shared clock, as the parts that take one hold it.
pub type SharedClock = Arc<dyn Clock>;

/// The system clock, shared.
pub fn system() -> SharedClock {
    Arc::new(SystemClock::new())
}

/// Seconds since the Unix epoch of `t` (0 before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch of `t` (0 before it, saturating).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The operating system's clocks.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    start: Instant,
}

impl SystemClock {
    /// A system clock whose [`Clock::elapsed`] counts from now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// A clock that moves only when told to, for tests: both the wall time and
/// the monotonic time advance by [`ManualClock::advance`].
#[derive(Debug)]
pub struct ManualClock {
    /// wall time at creation
    start: SystemTime,
    /// nanoseconds advanced since creation
    advanced_ns: AtomicU64,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self {
            start,
            advanced_ns: AtomicU64::new(0),
        }
    }

    /// A clock standing at the current system time.
    pub fn starting_now() -> Self {
        Self::new(SystemClock::new().now())
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .advanced_ns
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_add(ns))
            });
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        self.start + self.elapsed()
    }

    fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.advanced_ns.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let c = ManualClock::new(start);
        assert_eq!(c.now(), start);
        assert_eq!(c.elapsed(), Duration::ZERO);
        assert_eq!(c.unix_secs(), 1_700_000_000);
        c.advance(Duration::from_millis(1_500));
        assert_eq!(c.unix_ms(), 1_700_000_001_500);
        assert_eq!(c.elapsed(), Duration::from_millis(1_500));
    }

    #[test]
    fn times_before_the_epoch_read_as_zero() {
        let before = UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(unix_secs(before), 0);
        assert_eq!(unix_ms(before), 0);
    }
}
